"""Bring your own service: the contract a service's template and stack honour, its pre-flight check and its
scaffold (see docs/service-contract.md)."""
