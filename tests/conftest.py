"""Shared fixtures: one real ZenML server per session; one emulated cluster per test."""

pytest_plugins = ["fixtures_zenml", "fixtures_kube"]
