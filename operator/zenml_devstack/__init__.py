"""The development stack: everything that runs the operator without a cluster.

- `kube_emulator`: an emulated Kubernetes API (kmock subclass) served in-process;
- `kopf_runner`: the operator's Kopf registry run in a background thread or task;
- `zenml_server`: a real local ZenML server (from `.venv-zenml`) for the demo and the tests;
- `demo`: `make demo`.

NOT part of the product: the wheel and the container image hold only `zenml_operator`
(tests/unit/test_packaging.py checks it). It is imported from the checkout: `operator/` is
on `sys.path` through the editable install (`pip install -e`, hatch `dev-mode-dirs`) and
pytest's `pythonpath`. Its dependencies are the `demo` and `test` extras.
"""
