"""Secrets stay out of every file of a run: real stages print them whole, across the 64 KiB cut of
a long line, under env names like DB_PASS / SECRETKEY / X_KEY_B64, in an Azure connection string
and base64-, urlsafe-, percent- and hex-encoded, into their logs and into event messages; then
every file under OUT_DIR is read as bytes. Also: heidi's own HEIDI_API_TOKEN reaches a stage only
when its `env` names it, and the example test gate shows generated code no key.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, quote_plus

import orjson
from test_stages import pipeline  # noqa: F401 - the fixture: a repo root and the CLI against it

_rng = random.Random(4242)
_ALNUM = string.ascii_letters + string.digits


def _fake(n: int) -> str:
    return _rng.choice(string.ascii_letters) + "".join(_rng.choice(_ALNUM) for _ in range(n - 1))


GH_TOKEN = "ghp_" + _fake(36)
DB_PASS = "db-" + _fake(17) + "/+?&="
SECRETKEY = "sk:" + _fake(21) + "~>?"
X_KEY_B64 = base64.b64encode(random.Random(1).randbytes(33)).decode()
API_TOKEN = "heidi-api-" + _fake(24)
ACCOUNT_KEY = base64.b64encode(random.Random(2).randbytes(64)).decode()
CUT = 64 * 1024


def _encodings(value: str) -> list[str]:
    raw = value.encode()
    b64, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    return [value, b64, b64.rstrip("="), url, url.rstrip("="), raw.hex(), raw.hex().upper(),
            quote(value, safe=""), quote(value), quote_plus(value),
            re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote(value, safe="")),
            "".join(f"%{b:02X}" for b in raw)]


def _embedded_cores(value: str) -> list[str]:
    """For the value inside a base64 blob at offsets 0-2: the chars that only it decides."""
    raw, cores = value.encode(), []
    for offset in range(3):
        blob = base64.b64encode(bytes(offset) + raw + b"\x00").decode()
        cores.append(blob[(8 * offset + 5) // 6:(8 * (offset + len(raw))) // 6])
    return cores


# The generate stage: prints every form, writes its output and a counters file whose invalid
# key carries the hex of a secret (an event message that no stage log saw).
GENERATE = """
import argparse, base64, json, os, re, sys
from urllib.parse import quote, quote_plus
p = argparse.ArgumentParser(); p.add_argument("--samples", type=int)
p.add_argument("--output"); p.add_argument("--round", type=int)
a = p.parse_args()
token, cut = {token!r}, {cut}
# a long line (a progress bar): the token starts 15 bytes before the 64 KiB cut, and again later
out = sys.stdout
out.write("\\rstep 1/9 " + "=" * (cut - 15 - 11) + " " + token + " ")
out.flush()
out.write("-" * 100000 + " " + token + " " + "=" * 70000 + "\\n")
out.flush()
for name in ("DB_PASS", "SECRETKEY", "X_KEY_B64"):
    value = os.environ[name]
    raw = value.encode()
    b64, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    forms = [value, b64, b64.rstrip("="), url, url.rstrip("="), raw.hex(), raw.hex().upper(),
             quote(value, safe=""), quote(value), quote_plus(value),
             re.sub("%[0-9A-F]{{2}}", lambda m: m.group(0).lower(), quote(value, safe="")),
             "".join("%{{:02X}}".format(b) for b in raw)]
    for form in forms:
        print(name, "as", form)
    for offset in range(3):
        print(name, "in a blob:", base64.b64encode(os.urandom(offset) + raw + os.urandom(5)).decode())
print("conn DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={account_key};EndpointSuffix=core.windows.net")
print("API token here:", "HEIDI_API_TOKEN" in os.environ)
json.dump(dict(os.environ), open({env_dump!r}, "w"))
with open(os.environ["HEIDI_COUNTERS_FILE"], "w") as f:
    json.dump({{os.environ["DB_PASS"].encode().hex() + "!": 1}}, f)
with open(a.output, "w") as f:
    for i in range(a.samples):
        f.write(json.dumps({{"id": i}}) + "\\n")
"""

# train fails, its last words being encoded secrets: they reach the pipeline_error event.
TRAIN_FAILS = """
import base64, os, sys
print("passed on:", os.environ.get("HEIDI_API_TOKEN"))
print("b64", base64.b64encode(os.environ["SECRETKEY"].encode()).decode())
print("hex", os.environ["X_KEY_B64"].encode().hex())
sys.exit(4)
"""


def _all_bytes(out_dir: Path) -> dict[str, bytes]:
    files = {}
    for root, _dirs, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                files[os.path.relpath(path, out_dir)] = fh.read()
    return files


def test_no_secret_form_reaches_any_file_of_the_run(pipeline, tmp_path):  # noqa: F811
    scripts = pipeline.root / "repo" / "scripts"
    env_dump = tmp_path / "generate_env.json"
    (scripts / "01_teacher_generate.py").write_text(GENERATE.format(
        token=GH_TOKEN, cut=CUT, account_key=ACCOUNT_KEY, env_dump=str(env_dump)))
    (scripts / "04_train_qlora.py").write_text(TRAIN_FAILS)
    pipeline.toml("""
        [stages.train]
        command = ["{python}", "{scripts_dir}/04_train_qlora.py"]
        env = { HEIDI_API_TOKEN = "${HEIDI_API_TOKEN}" }
    """)
    res = pipeline.cli("run", DB_PASS=DB_PASS, SECRETKEY=SECRETKEY, X_KEY_B64=X_KEY_B64,
                       HEIDI_API_TOKEN=API_TOKEN, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr

    # The stages ran and printed: the placeholders are there, so the checks below are not empty.
    log = (pipeline.out_dir / "logs" / "round_1" / "generate.log").read_text()
    assert log.count("[GITHUB_TOKEN]") == 2 and "AccountKey=[SECRET];" in log
    assert log.count("[ENV_SECRET]") >= 3 * 15 and "API token here: False" in log
    events = pipeline.events()
    warned = [e for e in events if e["event_type"] == "counters_invalid"]
    assert len(warned) == 1 and "[ENV_SECRET]" in warned[0]["message"]
    failed = [e for e in events if e["event_type"] == "pipeline_error"]
    assert len(failed) == 1 and failed[0]["message"].count("[ENV_SECRET]") >= 3, failed

    # heidi's own token: not in generate's environment; train named it in its env, got it, and
    # printed it -- redacted.
    assert "HEIDI_API_TOKEN" not in orjson.loads(env_dump.read_bytes())
    assert "passed on: [ENV_SECRET]" in (pipeline.out_dir / "logs" / "round_1" / "train.log").read_text()

    secrets = {"github token": GH_TOKEN, "its second half": GH_TOKEN[-18:],
               "account key": ACCOUNT_KEY, "account key's end": ACCOUNT_KEY[-20:],
               "api token": API_TOKEN}
    for name, value in (("DB_PASS", DB_PASS), ("SECRETKEY", SECRETKEY), ("X_KEY_B64", X_KEY_B64)):
        for i, form in enumerate(_encodings(value) + _embedded_cores(value)):
            secrets[f"{name} form {i}"] = form
    files = _all_bytes(pipeline.out_dir)
    # The counters file is the stage's own writing (like its data files), read by heidi as is:
    # it holds the key the stage wrote. Everything heidi wrote is checked.
    del files[os.path.join("logs", "round_1", "generate.counters.json")]
    assert {"events.jsonl", "state.json", os.path.join("logs", "round_1", "generate.log")} <= set(files)
    leaks = [(name, path) for path, data in files.items() for name, value in secrets.items()
             if value.encode() in data]
    assert leaks == []


def test_the_example_gate_shows_generated_code_no_key(tmp_path):
    # A "generated" sample that dumps its environment and fails: its last line (the dump) is what
    # the gate prints about it. One that asserts it sees no key passes.
    gate = Path(__file__).resolve().parent.parent / "heidi" / "example" / "scripts" / "03_unit_test_gate.py"
    key, token = "sk-" + _fake(40), "hf_" + _fake(34)
    dump = {"id": "dump", "instruction": "x", "input": "assert False\n",
            "output": "```python\nimport os\nraise SystemExit(repr(sorted(os.environ.items())))\n```"}
    blind = {"id": "blind", "instruction": "x",
             "input": "assert not [n for n in os.environ if 'KEY' in n or 'TOKEN' in n]\n"
                      "assert os.environ['HOME'] == os.getcwd()\n",
             "output": "```python\nimport os\n```"}
    src, out = tmp_path / "clean.jsonl", tmp_path / "tested.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in (dump, blind)))
    env = dict(os.environ, OPENAI_API_KEY=key, HF_TOKEN=token, HEIDI_API_TOKEN=API_TOKEN)
    run = subprocess.run([sys.executable, str(gate), "--input", str(src), "--output", str(out)],
                         check=False, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "passed 1, failed 1" in run.stdout
    assert "dump failed: [('HOME', " in run.stdout and "'PATH'" in run.stdout
    for secret in (key, token, API_TOKEN, "OPENAI_API_KEY", "HF_TOKEN"):
        assert secret not in run.stdout
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["blind"]


def test_a_stage_does_not_get_heidis_token_unless_its_env_names_it(pipeline, tmp_path):  # noqa: F811
    seen = tmp_path / "env.json"
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "-c", "import json, os; json.dump(dict(os.environ), open({str(seen)!r}, 'w')); raise SystemExit(1)"]
    """)
    pipeline.cli("run", HEIDI_API_TOKEN=API_TOKEN, TEACHER_API_KEY="teacher-" + _fake(20))
    env = orjson.loads(seen.read_bytes())
    assert "HEIDI_API_TOKEN" not in env
    assert env["TEACHER_API_KEY"].startswith("teacher-")  # `heidi generate` needs the teacher's key
    pipeline.toml(f"""
        [stages.generate]
        command = ["{{python}}", "-c", "import json, os; json.dump(dict(os.environ), open({str(seen)!r}, 'w')); raise SystemExit(1)"]
        env = {{ HEIDI_API_TOKEN = "${{HEIDI_API_TOKEN}}" }}
    """)
    seen.unlink()
    pipeline.cli("run", HEIDI_API_TOKEN=API_TOKEN, OUT_DIR=str(tmp_path / "second"))
    assert orjson.loads(seen.read_bytes())["HEIDI_API_TOKEN"] == API_TOKEN
