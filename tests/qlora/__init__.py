"""The QLoRA tests. They need bitsandbytes, which ./launch.sh installs beside the venv ($VENV/extras/qlora), not in it:
peft imports bitsandbytes in every process whenever it can (~2 s each, which every other test would then pay). So the
suite collects them only in the process tests/integration/test_qlora.py starts with that folder on its path
(FINETUNE_QLORA_TESTS=1, tests/conftest.py); run them alone with
`FINETUNE_QLORA_TESTS=1 PYTHONPATH=.venv/extras/qlora .venv/bin/python -m pytest -p no:xdist tests/qlora`."""
