"""Test harness that drives the real cloud-init 22.4.2 client against a metadata URL.

``cloudinit`` runs ``ci_driver.py`` in a subprocess against cloud-init's own
datasource code, extracted from Debian 12's package by ``scripts/fetch-cloud-init``
(never installed). ``fixtures`` holds the pytest fixture for it.
"""
