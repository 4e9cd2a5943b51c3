"""What libraries log never breaks or clutters a command's stderr. gptqmodel's output goes to a log file while
it is imported or run (`quiet_gptqmodel`); libraries imported then (tokenicer calls `logging.basicConfig`,
datasets and transformers add a `StreamHandler`) bind their logging handlers to that file, so it stays open
for the process, and their INFO messages (gguf's endianness note among them) land there, not on the terminal."""

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qra.cli import _log_progress
from qra.runtime.quantize import quiet_gptqmodel
from qra.testing import save_tiny_model, tiny_corpus

QRA = shutil.which("qra", path=str(Path(sys.executable).parent)) or shutil.which("qra")

# In a fresh interpreter: the CLI's setup imports gptqmodel (and through it tokenicer, datasets, transformers)
# under the redirect; then every handler's stream is checked, and a library logs at INFO as gguf does.
AFTER_SETUP = """
import json, logging
from qra.cli import _log_progress
_log_progress()
loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
handlers = [handler for logger in loggers if isinstance(logger, logging.Logger) for handler in logger.handlers]
closed = [repr(handler) for handler in handlers if getattr(getattr(handler, "stream", None), "closed", False)]
logging.getLogger("gguf.gguf_writer").info("gguf: This GGUF file is for Little Endian only")
print(json.dumps(closed))
"""


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "Logging error" not in stderr, stderr


def test_a_handler_made_while_gptqmodel_is_quiet_keeps_writing_to_its_log_after_the_block(tmp_path):
    logger = logging.getLogger("test_cli_logging.library")
    with quiet_gptqmodel(tmp_path):
        handler = logging.StreamHandler()  # binds sys.stderr of the moment: the log file
    logger.addHandler(handler)
    try:
        logger.warning("logged after the block")
        assert not handler.stream.closed
        handler.flush()
        assert "logged after the block" in (tmp_path / "gptqmodel.log").read_text()
    finally:
        logger.removeHandler(handler)


def test_after_the_cli_imports_gptqmodel_no_handler_holds_a_closed_stream_and_library_info_goes_to_its_log(tmp_path):
    env = os.environ | {"TMPDIR": str(tmp_path)}  # gptqmodel's log folder is under the temporary directory
    done = subprocess.run([sys.executable, "-c", AFTER_SETUP], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    assert_no_traceback(done.stderr)
    assert "Little Endian" not in done.stderr
    assert "Little Endian" in (tmp_path / "qra-gptqmodel" / "gptqmodel.log").read_text()


def test_qra_progress_messages_go_to_the_stderr_of_the_moment_not_to_one_closed_since(capsys):
    with contextlib.redirect_stderr(io.StringIO()) as earlier:  # a test runner's capture, closed when it ends
        _log_progress()
    earlier.close()
    logging.getLogger("qra.test_cli_logging").info("a stage message")
    captured = capsys.readouterr()
    assert captured.err == "a stage message\n"


def test_materialize_to_gguf_prints_no_traceback_on_its_way_to_success(tmp_path):
    if QRA is None:
        pytest.skip("the qra script is not installed")
    pytest.importorskip("llama_cpp", reason="--format gguf needs llama-cpp-python (tools/install.sh)")
    model = save_tiny_model(tmp_path / "model", "llama", layers=2)
    data = tiny_corpus(tmp_path / "data.jsonl")
    env = os.environ | {"TMPDIR": str(tmp_path)}

    def qra(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([QRA, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)

    planned = qra("plan", "new", "--model", model, "--budget", "2GB", "--group-size", "32", "--seq-len", "48",
                  "--batch-size", "2", "--steps", "1", "-o", tmp_path / "plan.yaml")
    assert planned.returncode == 0, planned.stderr
    done = qra("materialize", tmp_path / "plan.yaml", "-o", tmp_path / "run", "--data", data, "--format", "gguf")
    assert done.returncode == 0, done.stderr
    assert_no_traceback(done.stderr)
    assert "gguf:" in done.stdout  # the package's folder, as the last lines name each format's
