"""The README's quick start runs as written: its Python block captions and answers an image with no traceback, and
the commands it names exist."""

import re
import subprocess
import sys

from helpers import REPO, subprocess_env


def quick_start() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Quick start"):].split("\n## ", 1)[0]


def test_the_quick_start_python_block_captions_and_answers_an_image():
    (block,) = re.findall(r"```python\n(.*?)```", quick_start(), flags=re.S)[:1]
    assert len([line for line in block.splitlines() if line.strip()]) == 5
    result = subprocess.run([sys.executable, "-c", block], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith("[") and "] [" in result.stdout  # a caption list and an answer list


def test_the_quick_start_says_what_exists_and_names_java_and_test_dev():
    text = quick_start()
    assert "No X-Former weights are released" in text and 'load_model("xformer", "pretrain")' in text
    assert "Java" in text and "EvalAI" in text and "test-dev" in text
    assert "stage 1 -> stage 2 -> evaluate -> fine-tune" in text and "lavis-xformer check" in text
