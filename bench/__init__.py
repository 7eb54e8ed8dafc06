"""Benchmarks of meta169 serve and proxy against nginx and haproxy anchors.

``python -m bench.run {serve,proxy-rss,proxy-rps,all,clean}``; see docs/benchmarks.md.
Everything here talks only to loopback or to network namespaces it creates itself
(named ``m169b-...``) and removes them, and every process it starts, on exit.
"""
