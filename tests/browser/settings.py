"""playwright.config.py (repo root) loaded as a module; its name has a dot, so not importable directly."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("playwright_config", ROOT / "playwright.config.py")
config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config)
