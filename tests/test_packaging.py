"""setup.cfg lists its packages explicitly (gpu/ installs as refattn.gpu): keep it complete."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "refattn").rglob("__init__.py")}
    missing = found - listed
    assert not missing, f"add these packages to setup.cfg [options] packages: {sorted(missing)}"
    assert "refattn.gpu" in listed and "refattn.gpu = gpu" in cfg["options"]["package_dir"]
    assert (ROOT / "gpu" / "__init__.py").exists()
