"""Write docs/configuration.md from paper_assets/settings.py (the one place each setting is declared)."""

from pathlib import Path

from paper_assets.settings import configuration_document

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    target.write_text(configuration_document(), encoding="utf-8")
    print(f"wrote {target}")
