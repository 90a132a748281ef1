"""Write tests/durations.json (seconds per test file) from a JUnit report, for the scheduling in conftest.py.

.venv/bin/python -m pytest -q -n 2 --dist loadfile --junitxml=/tmp/junit.xml
.venv/bin/python tests/update_durations.py /tmp/junit.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parent / "durations.json"


def file_seconds(junit: Path) -> dict[str, float]:
    """Test file (as ``tests/test_x.py``) -> the summed time of its tests, setup and teardown included."""
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x, tests.gpu.test_y or tests.test_x.TestClass
        while parts and parts[-1][:1].isupper():
            parts.pop()
        if parts:
            seconds["/".join(parts) + ".py"] += float(case.get("time", 0))
    return {name: round(s, 1) for name, s in sorted(seconds.items())}


if __name__ == "__main__":
    OUT.write_text(json.dumps(file_seconds(Path(sys.argv[1])), indent=1) + "\n")
    print(f"wrote {OUT}")
