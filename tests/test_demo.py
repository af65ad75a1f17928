"""demo.sh replaces only a folder it made itself: pointed at any other folder (or file), it stops
before touching it. The demo's own run is .ci/run's first step, in a fresh virtual environment."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    for target in (tmp_path / "work", tmp_path / "notes.txt"):
        if target.suffix:
            target.write_text("keep me")
        else:
            target.mkdir()
            (target / "precious").write_text("keep me")
        done = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=dict(os.environ, DEMO_DIR=str(target)),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert done.stderr == f"demo.sh: {target} exists and was not made by demo.sh: set DEMO_DIR to a new folder\n"
        assert (target if target.suffix else target / "precious").read_text() == "keep me"
