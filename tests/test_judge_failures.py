"""A judge or critic server that stops answering stops the run, or is named; it never passes as "judge" (issue 35).

The server here is a real process-local HTTP server on loopback (the standard library's, written below, not
`lora_cai.serve`): it lists one model and answers chat completions as a judge would (the option whose text is
longer, with log-probs when asked) or as a critic would, until it is told to fail: after N answers, or for
the requests that contain a given text, it answers HTTP 500 (with `Retry-After: 0`, so the client's retries
are quick) or closes the connection without answering. The runs are the real CLI on the tiny model.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_cli, write_recipe

VERDICT = re.compile(r"\(A\) (.*)\n\n\(B\) (.*)\n\n(?:Answer with|First explain)", re.DOTALL)


class Judge(ThreadingHTTPServer):
    """A stdlib OpenAI-compatible judge and critic on 127.0.0.1.

    `answer`: completions answered before the server fails every later one (None: never); `fail_when`: texts of
    which any one, found in a request, fails it; `fault`: "500" or "close" (the connection closed unanswered);
    `logprobs`: whether answers carry the log-probs a request asks for. `requests` keeps every request body.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, *, answer: int | None = None, fail_when: tuple[str, ...] = (),
                 fault: str = "500", logprobs: bool = True):
        super().__init__(("127.0.0.1", port), _Handler)
        self.answer, self.fail_when, self.fault, self.logprobs = answer, fail_when, fault, logprobs
        self.requests: list[dict] = []
        self.answered = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def decide(self, body: dict) -> bool:
        """Whether this request is answered (counted) or fails."""
        text = json.dumps(body["messages"])
        with self.lock:
            self.requests.append(body)
            if any(json.dumps(t)[1:-1] in text for t in self.fail_when):
                return False
            if self.answer is not None and self.answered >= self.answer:
                return False
            self.answered += 1
            return True


class _Handler(BaseHTTPRequestHandler):
    server: Judge

    def log_message(self, *args):  # keep the test output clean
        pass

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if not self.server.decide(body):
            if self.server.fault == "close":
                self.close_connection = True  # the socket closes with no answer: the client sees a disconnect
                return
            self._json(500, {"error": "judge crashed"}, {"Retry-After": "0"})
            return
        content = body["messages"][-1]["content"]
        m = VERDICT.search(content)
        if m:  # a judge question: the longer option, P = 0.9 (ties go to A)
            pick = "B" if len(m.group(2)) > len(m.group(1)) else "A"
            other = "A" if pick == "B" else "B"
            text = pick
            lp = [{"token": pick, "logprob": math.log(0.9), "bytes": list(pick.encode()),
                   "top_logprobs": [{"token": pick, "logprob": math.log(0.9)},
                                    {"token": other, "logprob": math.log(0.1)}]}]
        else:  # a critique or a revision request
            text, lp = "The response should refuse clearly and point to safe help.", None
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if body.get("logprobs") and self.server.logprobs and lp is not None:
            choice["logprobs"] = {"content": lp}
        self._json(200, {"id": "x", "object": "chat.completion", "choices": [choice]})


@pytest.fixture
def judges():
    started: list[Judge] = []

    def start(**kw) -> Judge:
        srv = Judge(**kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        try:
            srv.stop()
        except OSError:
            pass


def error_line(proc) -> str:
    """The run's last stderr line, which must be its one error line (no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr[-3000:]
    return line


def judge_kinds(srv: Judge) -> dict[str, int]:
    """The server's requests by purpose: refusal verdicts, win rate, pair labels, critiques."""
    from lora_cai.engine.judges import REFUSAL_QUESTION, WIN_RATE_QUESTION

    out = {"refusal": 0, "win_rate": 0, "pairs": 0, "critique": 0}
    for body in srv.requests:
        text = body["messages"][-1]["content"]
        key = ("refusal" if REFUSAL_QUESTION in text else "win_rate" if WIN_RATE_QUESTION in text
               else "pairs" if VERDICT.search(text) else "critique")
        out[key] += 1
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Model-free: the counts, the label, the stop line
# --------------------------------------------------------------------------------------------------

def test_the_detector_label_says_how_many_answers_fell_back():
    from lora_cai.cai.refusal import HEURISTIC, detector_label

    assert detector_label(16, 0) == "judge"
    assert detector_label(16, 3) == f"judge (3 of 16 answers fell back to the {HEURISTIC})"
    assert detector_label(16, 16) == f"{HEURISTIC} (the judge decided none of 16 answers)"


def test_a_server_judge_counts_failures_and_answers_without_log_probs(judges, tmp_path):
    """Against the real server: 2 of 6 requests answered HTTP 500 (after the client's retries), then a server that
    answers without log-probs: every answer counts as missing them, and the stop line names the server flags."""
    from lora_cai.engine.api import ChatClient
    from lora_cai.engine.calls import stop_if_failing
    from lora_cai.errors import UserError
    from lora_cai.engine.judges import APIJudge, Comparison, judge_comparisons

    comps = [Comparison(f"p{i}", f"Question {i}?", "A short one." if i else "Bad one.", "A much longer answer here.",
                        None, "Which is better?") for i in range(3)]
    srv = judges(fail_when=("Question 0?",))
    judge = APIJudge(ChatClient(srv.url, "judge", concurrency=2, max_retries=2, backoff=0.01), top_logprobs=5)
    recs = judge_comparisons(judge, comps)
    c = judge.calls
    assert (c.requests, c.failures, c.missing_logprobs) == (6, 2, 0)
    assert "HTTP 500" in c.last_error and len(srv.requests) == 2 * 3 + 4  # each failed request tried 3 times
    assert recs[0]["p_raw"] is None and (recs[0]["failed"], recs[0]["requests"]) == (2, 2)
    assert recs[1]["p_raw"] == pytest.approx(0.1) and "failed" not in recs[1]  # B, the longer one, in both orders
    from lora_cai.engine.judges import calls_of

    again = calls_of(recs)
    assert (again.requests, again.failures) == (6, 2) and "HTTP 500" in again.last_error
    with pytest.raises(UserError) as e:  # 2 of 6 > 10 % of 6: certain already
        stop_if_failing(c, 6, 0.1, where="round 1 judge", who="judge", url=srv.url)
    line = str(e.value)
    assert line.startswith("round 1 judge: 2 of 6 requests to the judge's server at " + srv.url + " failed")
    assert "HTTP 500" in line and f"curl {srv.url}/models" in line and "rerun the same command" in line
    stop_if_failing(c, 20, 0.1, where="x", who="judge", url=srv.url)  # 2 of 20 planned: not more than 10 %
    stop_if_failing(c, 6, 0.34, where="x", who="judge", url=srv.url)  # 2 of 6 <= 34 %

    mute = judges(logprobs=False)
    judge = APIJudge(ChatClient(mute.url, "judge", concurrency=2), top_logprobs=5)
    recs = judge_comparisons(judge, comps)
    assert (judge.calls.requests, judge.calls.failures, judge.calls.missing_logprobs) == (6, 0, 6)
    assert recs[1]["p_raw"] == 0.0 and recs[1]["missing_logprobs"] == 2  # the verdict is read from the text
    with pytest.raises(UserError) as e:
        stop_if_failing(judge.calls, 6, 0.1, where="baseline eval", who="judge", url=mute.url, top_logprobs=5)
    assert "6 of 6 answers from the judge's server" in str(e.value) and "--logits_all true" in str(e.value)
    assert "--max-logprobs 5" in str(e.value)


def test_a_builtin_name_runs_the_builtin_even_beside_a_folder_of_that_name(tmp_path, monkeypatch, capsys):
    """The notebooks' smoke mode leaves a `smoke/` folder; `python -m lora_cai.recipe smoke` still means the
    built-in. A file path runs the file; a folder that is no built-in's name is the error."""
    from lora_cai.config.builtin import builtin_recipes, find_recipe
    from lora_cai.recipe import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke" / "tiny-model").mkdir(parents=True)
    assert find_recipe("smoke") == builtin_recipes()["smoke"]
    assert main(["smoke", "--copy", "mine.yaml"]) == 0
    assert (tmp_path / "mine.yaml").read_text() == builtin_recipes()["smoke"].read_text()
    (tmp_path / "smoke2").write_text("model: {name: m}\ndata: {prompts: builtin:smoke}\n")
    assert find_recipe("smoke2") == Path("smoke2")  # a file runs the file
    (tmp_path / "myrun").mkdir()
    capsys.readouterr()
    assert main(["myrun", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: myrun: is a directory, not a recipe file (give a built-in recipe name such as smoke, or "
                   "the path to a YAML recipe)")


# --------------------------------------------------------------------------------------------------
# Real runs of the CLI on the tiny model against the server
# --------------------------------------------------------------------------------------------------

# One round, best-of-N pairs judged by the server (no critique), no capability probe or critic check.
SETS = ("--set", "rounds=1", "--set", "critique.steps=0")


def _recipe(tmp_path: Path, tiny_model: Path, url: str, **extra: str) -> Path:
    extra.setdefault("judge", f"{{kind: api, base_url: '{url}', model: judge, top_logprobs: 2, concurrency: 1}}")
    extra.setdefault("pairs", "{builder: best_of_n, n_samples: 3}")
    extra.setdefault("eval", "{early_stop_drop: null, capability_limit: 0, critic_check: false}")
    return write_recipe(tmp_path / "r.yaml", tiny_model, tmp_path / "run", **extra)


def test_a_judge_that_dies_mid_stage_stops_it_and_a_rerun_resumes(tiny_model, judges, tmp_path):
    """The server answers the baseline's 8 refusal calls and two batches of pair labels (4 comparisons, 8 calls
    each), then answers HTTP 500: the judge stage stops before committing its third batch, in one line, exit 2.
    Against a healthy server on the same address (and with the answer cache deleted, so that anything redone
    would reach the server again) the rerun finishes, and the baseline and the two committed batches are not
    redone."""
    import shutil

    first = judges(answer=8 + 16)
    port = first.server_address[1]
    recipe = _recipe(tmp_path, tiny_model, first.url)
    proc = run_cli(str(recipe), *SETS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f"error: round 1 judge (pair labels): 8 of 24 requests to the judge's server at "
                           f"{first.url} failed (more than judge.max_failures = 10% of the stage's ")
    assert "last error: " in line and "HTTP 500" in line and f"curl {first.url}/models" in line
    assert "committed work is kept" in line
    run = tmp_path / "run"
    assert judge_kinds(first)["refusal"] == 8 and not (run / "round-1" / "eval.json").exists()
    meta = json.loads((run / "round-1" / "judgments.jsonl.meta.json").read_text())
    assert meta["batches"] == [0, 1] and meta["count"] == 8 and not meta["complete"]
    kept = {name: (run / name).stat() for name in ("baseline-eval.json", "round-1/responses.jsonl",
                                                    "round-1/samples.jsonl")}
    judged = run / "round-1" / "judgments.jsonl"
    committed, inode = judged.read_bytes(), judged.stat().st_ino
    assert len(first.requests) == 8 + 16 + 8 * 6  # the failed batch: 8 requests, each sent 1 + 5 retries times

    first.stop()
    shutil.rmtree(run / "cache" / "judge")
    healthy = judges(port=port)
    proc = run_cli(str(recipe), *SETS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "redoing" not in proc.stderr
    for name, before in kept.items():
        after = (run / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert judged.stat().st_ino == inode and judged.read_bytes().startswith(committed)  # appended to, not redone
    judgments = read_jsonl(judged)
    asked = judge_kinds(healthy)
    assert asked["refusal"] == 8 and asked["pairs"] == 2 * (len(judgments) - 8)  # only the uncommitted comparisons
    assert len(judgments) > 8 and not any(j.get("failed") for j in judgments)
    ev = json.loads((run / "round-1" / "eval.json").read_text())
    assert ev["detector"] == "judge" and ev["judge_calls"]["refusal"]["failures"] == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rounds"]["1"]["judge"]["calls"] == {"requests": 2 * len(judgments), "failures": 0,
                                                         "missing_logprobs": 0, "unusable_logprobs": 0,
                                                         "last_error": None}


def test_below_the_limit_the_run_finishes_and_names_the_fallbacks(tiny_model, judges, tmp_path):
    """The server fails every request about one held-out harmful prompt and every win-rate request. Under
    judge.max_failures 0.7 the run finishes: eval.json, the summary line, the round table and the report name how
    many answers fell back to the heuristic, and the win rate is absent and says so, never a silent null."""
    from lora_cai.config.load import load_recipe
    from lora_cai.engine.judges import WIN_RATE_QUESTION
    from lora_cai.data.rundata import load_run_data

    harmful = load_run_data(load_recipe(_recipe(tmp_path, tiny_model, "http://127.0.0.1:9/v1"))
                            ).eval_sets["harmful"][0]["prompt"]
    srv = judges(fail_when=(harmful, WIN_RATE_QUESTION))
    recipe = _recipe(tmp_path, tiny_model, srv.url,
                     judge=f"{{kind: api, base_url: '{srv.url}', model: judge, top_logprobs: 2, concurrency: 4, "
                           f"max_failures: 0.7}}")
    proc = run_cli(str(recipe), *SETS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    label = "judge (1 of 4 answers fell back to the refusal-phrase heuristic)"
    for name in ("baseline-eval.json", "round-1/eval.json"):
        ev = json.loads((run / name).read_text())
        assert ev["detector"] == label, name
        assert (ev["judge_decided"], ev["judge_unanswered"]) == (3, 1), name
        assert ev["judge_calls"]["refusal"]["requests"] == 8 and ev["judge_calls"]["refusal"]["failures"] == 2
        assert "HTTP 500" in ev["judge_calls"]["refusal"]["last_error"]
        fell = [s for s in ev["samples"] if s["refusal_judge"] is None]
        assert [s["prompt"] for s in fell] == [harmful] and fell[0]["refusal"] == fell[0]["refusal_heuristic"]
    ev = json.loads((run / "round-1" / "eval.json").read_text())
    win = ev["win_rate"]
    changed = win["compared"] - win["ties"]
    assert changed > 0  # the trained round answers differently: the win rate had something to judge
    assert "win_rate" not in win and win["judged"] == 0 and win["garbled"] == changed
    assert win["absent"] == f"the judge gave no verdict on any of the {changed} changed answers"
    assert ev["judge_calls"]["win_rate"]["failures"] == ev["judge_calls"]["win_rate"]["requests"] == 2 * changed
    out = " ".join(proc.stderr.split())
    assert f"benign prompts, {label}; policy = base + rounds 1..1)" in out  # the before -> after line
    assert "refusals decided by" in out and "absent:" in out  # the round table
    report = (run / "report.md").read_text()
    top = report[:report.index("## Plots")]
    assert f"- refusals decided by: {label}" in top
    assert f"- win rate vs previous round: absent ({win['absent']})" in top
    assert f"round 1 eval (win rate): {2 * changed} of {2 * changed} judge calls failed" in top
    assert "baseline eval (refusal): 2 of 8 judge calls failed" in top
    metrics = report[report.index("## Held-out metrics per round"):]
    assert label in metrics


def test_a_judge_without_log_probs_stops_the_first_stage_that_asks(tiny_model, judges, tmp_path):
    """Answers without the log-probs asked for are judge failures: the baseline evaluation stops, naming the flags
    that turn them on; nothing of it is written."""
    srv = judges(logprobs=False)
    proc = run_cli(str(_recipe(tmp_path, tiny_model, srv.url)), *SETS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f"error: baseline eval (refusal verdicts): 8 of 8 answers from the judge's server at "
                           f"{srv.url} came without the log-probs they asked for")
    assert "--logits_all true" in line and "--max-logprobs 2" in line and "rerun the same command" in line
    assert not (tmp_path / "run" / "baseline-eval.json").exists()


def test_a_critic_server_that_closes_its_socket_stops_the_critique_and_a_rerun_resumes(tiny_model, judges,
                                                                                     tmp_path):
    """`critic: api`: the server answers 3 critique requests, then closes every connection unanswered. The critique
    step stops before its commit (one line, exit 2); the committed responses are kept, and against the server back
    on the same address the rerun finishes with every critique answered."""
    first = judges(answer=3, fault="close")
    port = first.server_address[1]
    recipe = _recipe(tmp_path, tiny_model, first.url, critic="api", pairs="{builder: revision}",
                     judge=f"{{kind: api, base_url: '{first.url}', model: judge, top_logprobs: 2, concurrency: 8}}")
    sets = ("--set", "rounds=1", "--set", "critique.steps=1", "--set", "data.eval_limit=0")
    proc = run_cli(str(recipe), *sets)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert line.startswith(f"error: round 1 critique step 1: 3 of 6 requests to the critic's server at {first.url} "
                           f"failed")
    assert "RemoteDisconnected" in line or "Connection" in line, line
    run = tmp_path / "run"
    responses = (run / "round-1" / "responses.jsonl").stat()
    assert read_jsonl(run / "round-1" / "critique-1.jsonl") == []
    first.stop()
    healthy = judges(port=port)
    proc = run_cli(str(recipe), *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = (run / "round-1" / "responses.jsonl").stat()
    assert (after.st_ino, after.st_mtime_ns) == (responses.st_ino, responses.st_mtime_ns)
    crit = read_jsonl(run / "round-1" / "critique-1.jsonl")
    assert len(crit) == 6 and not any(r["status"] == "failed" for r in crit)
    assert judge_kinds(healthy)["critique"] == 6 + sum(r["requests"] == 2 for r in crit) - 3  # 3 cached
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rounds"]["1"]["critic_calls"]["failures"] == 0


def test_a_critic_server_that_fails_the_critic_check_stops_it_before_any_verdict(tiny_model, judges, tmp_path):
    """`critic: api` with the critic check on: a server that answers HTTP 500 to every completion stops the check in
    one line instead of reporting that the critic cannot tell harmful from benign; no critic-check.json is
    written, and against a healthy server the rerun writes it with every canary critiqued."""
    from lora_cai.data.heldout import load_canaries

    dead = judges(answer=0)
    port = dead.server_address[1]
    recipe = _recipe(tmp_path, tiny_model, dead.url, critic="api", pairs="{builder: revision}",
                     judge=f"{{kind: api, base_url: '{dead.url}', model: judge, top_logprobs: 2}}",
                     eval="{early_stop_drop: null, capability_limit: 0}")
    sets = ("--set", "rounds=1", "--set", "critique.steps=1", "--set", "data.eval_limit=0")
    proc = run_cli(str(recipe), *sets)
    assert proc.returncode == 2, proc.stderr[-3000:]
    n = len(load_canaries())
    line = error_line(proc)
    assert line.startswith(f"error: critic check: {n} of {n} requests to the critic's server at {dead.url} failed")
    assert "HTTP 500" in line and "cannot tell" not in line
    assert not (tmp_path / "run" / "critic-check.json").exists()
    dead.stop()
    judges(port=port)
    proc = run_cli(str(recipe), *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((tmp_path / "run" / "critic-check.json").read_text())
    assert check["critic_calls"]["requests"] == n and check["critic_calls"]["failures"] == 0
    assert check["failed"] == 0 and not any(s["verdict"] == "failed" for s in check["samples"])


def test_a_judge_that_fails_the_per_principle_stage_stops_it_and_a_rerun_resumes(tiny_model, judges, tmp_path):
    """eval.per_principle with a server judge that answers everything but the per-principle comparisons (the
    principle's question after the two answers): the round's evaluation is committed, the per-principle stage
    stops in one line naming the failed share, exit 2, and writes nothing. Against a healthy server on the same
    address the rerun redoes only that stage: the stored answers are judged, the evaluation is not redone."""
    from lora_cai.cai.constitution import load_constitution
    from lora_cai.engine.judges import ANSWER_INSTRUCTION

    questions = tuple(f"{p.judge}\n\n{ANSWER_INSTRUCTION}" for p in load_constitution("default").principles)
    first = judges(fail_when=questions)
    port = first.server_address[1]
    eval_ = "{early_stop_drop: null, capability_limit: 0, critic_check: false, per_principle: true}"
    recipe = _recipe(tmp_path, tiny_model, first.url, eval=eval_,
                     sft="{batch_size: 4, learning_rate: 0.002}", dpo="{batch_size: 4, learning_rate: 0.01, epochs: 3}")
    proc = run_cli(str(recipe), *SETS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    run = tmp_path / "run"
    ev = run / "round-1" / "eval.json"
    assert ev.is_file() and not (run / "round-1" / "principles.json").exists()
    failed = [b for b in first.requests if any(json.dumps(q)[1:-1] in json.dumps(b["messages"]) for q in questions)]
    assert failed  # the round changed some answers, so there was something to judge
    assert line.startswith("error: round 1 per-principle effects: ") and "requests to the judge's server at " \
        f"{first.url} failed (more than judge.max_failures = 10% of the stage's " in line, line
    assert "HTTP 500" in line and "rerun the same command" in line
    evaluated = ev.stat()

    first.stop()
    healthy = judges(port=port)
    proc = run_cli(str(recipe), *SETS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ev.stat().st_ino, ev.stat().st_mtime_ns) == (evaluated.st_ino, evaluated.st_mtime_ns)
    p = json.loads((run / "round-1" / "principles.json").read_text())
    assert p["judge"] == "api" and len(p["win_rates"]) == len(questions)
    assert p["judge_calls"]["failures"] == 0 and p["judge_calls"]["requests"] == 2 * len(questions) * p["answers"]
    assert all(r["p"] is not None for r in p["records"])
    assert len(healthy.requests) == p["judge_calls"]["requests"]  # nothing else was asked again
