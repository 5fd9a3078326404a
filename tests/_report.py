"""What both demos' reports promise: enough pictures, each a file that opens."""

import re
from pathlib import Path

from PIL import Image


def assert_report_pictures_open(run_dir: Path, at_least: int = 10) -> str:
    """Every picture report.md links exists and decodes; returns the report's text."""
    report = (run_dir / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert len(links) >= at_least
    for link in links:
        path = run_dir / link
        assert path.is_file(), link
        if path.suffix in (".png", ".gif"):
            with Image.open(path) as image:
                image.verify()
    return report
