from meta169.cli import main

main(prog_name="meta169")
