"""Shared fixtures: one real ZenML server per session; one emulated cluster per test; the
secret-hygiene scan of every test that runs one."""

pytest_plugins = ["fixtures_zenml", "fixtures_kube", "hygiene"]
