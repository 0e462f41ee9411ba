"""Running a shipped bash completion script the way bash does: COMP_WORDS and COMP_CWORD set, the
script's function called, COMPREPLY printed one word per line."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def complete(command: str, *words: str) -> list[str]:
    """What packaging/completions/COMMAND offers for the command line `command words...` (the last word
    is the one being completed); this checkout's .venv/bin is first on PATH."""
    script = REPO / "packaging/completions" / command
    line = " ".join(shlex.quote(w) for w in (command, *words))
    code = (
        f"source {shlex.quote(str(script))}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; "
        f'_{command}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    env = dict(os.environ, PATH=f"{REPO / '.venv/bin'}:{os.environ['PATH']}")
    out = subprocess.run(
        ["bash", "-c", code], check=True, capture_output=True, text=True, env=env, timeout=60
    )
    return [w for w in out.stdout.splitlines() if w]
