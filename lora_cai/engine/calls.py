"""Counting a server's calls per stage and purpose, and stopping a stage whose judge or critic keeps failing."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lora_cai.errors import UserError

# How the common servers are told to return log-probs: named in the line that stops a judge whose server answers
# without them.
LOGPROB_FLAGS = ("llama-cpp-python: --logits_all true; vLLM: --max-logprobs {top} or more; TGI: --max-top-n-tokens "
                 "{top}")


@dataclass
class Calls:
    """A stage's calls to a server for one purpose (pair labels, refusal verdicts, win rate, critiques).

    `requests`: answers asked for; `failures`: requests that failed for good (after the client's retries);
    `missing_logprobs`: answers that came without the log-probs they asked for (a judge failure too);
    `unusable_logprobs`: answers whose log-probs name neither option (the text's verdict is read instead);
    `last_error`: the last failure's message (the client scrubs the API key from it).
    """

    requests: int = 0
    failures: int = 0
    missing_logprobs: int = 0
    unusable_logprobs: int = 0
    last_error: str | None = None

    def count(self, answers: list[dict], *, logprobs: bool = False) -> list[str | None]:
        """Count `chat_many` answers; per answer, what went wrong (None: nothing): 'failed' or 'no_logprobs'."""
        out: list[str | None] = []
        for a in answers:
            self.requests += 1
            if a.get("text") is None:
                self.failures += 1
                self.last_error = a.get("error") or "no answer"
                out.append("failed")
            elif logprobs and not a.get("logprobs"):
                self.missing_logprobs += 1
                out.append("no_logprobs")
            else:
                out.append(None)
        return out

    @property
    def failed(self) -> int:
        """Calls that count against `judge.max_failures`: failures and answers without the log-probs asked for."""
        return self.failures + self.missing_logprobs

    def __add__(self, other: "Calls") -> "Calls":
        return Calls(self.requests + other.requests, self.failures + other.failures,
                     self.missing_logprobs + other.missing_logprobs, self.unusable_logprobs + other.unusable_logprobs,
                     other.last_error or self.last_error)

    def as_dict(self) -> dict:
        return asdict(self)


def stop_if_failing(calls: Calls, planned: int, limit: float, *, where: str, who: str, url: str,
                    top_logprobs: int | None = None) -> None:
    """Stop the stage (one-line `UserError`, exit 2) once its failed calls exceed `limit` of its `planned` calls.

    `planned` is the stage's calls in this process, counted or bounded from above, so the stage stops as soon as
    the share is certain to exceed the limit and never earlier. `who` names the role ("judge", "critic"), `url`
    the server. Work the stage committed before stays; a rerun resumes once the server answers again.
    """
    if calls.failed <= limit * max(planned, calls.requests):
        return
    parts = []
    if calls.failures:
        parts.append(f"{calls.failures} of {calls.requests} requests to the {who}'s server at {url} failed")
    if calls.missing_logprobs:
        parts.append(f"{calls.missing_logprobs} of {calls.requests} answers from the {who}'s server at {url} came "
                     f"without the log-probs they asked for")
    message = f"{where}: {' and '.join(parts)} (more than judge.max_failures = {100 * limit:g}% of the stage's " \
              f"{max(planned, calls.requests)} calls)"
    if calls.failures:
        message += (f"; last error: {calls.last_error}; check that the server is running and serves the model "
                    f"(curl {url}/models) and its log for a crash or an out-of-memory kill")
    if calls.missing_logprobs:
        message += ("; start the server with log-probs enabled ("
                    + LOGPROB_FLAGS.format(top=top_logprobs or 20) + ")")
    raise UserError(message + "; then rerun the same command: committed work is kept and the stage resumes")


def failed_calls(calls: dict | None, who: str, lead: str = ", ") -> str:
    """', 3 of 40 judge calls failed, 2 without log-probs' for a server's counts; '' when nothing failed."""
    if not calls or not (calls.get("failures") or calls.get("missing_logprobs")):
        return ""
    parts = [f"{calls['failures']} of {calls['requests']} {who} calls failed"] if calls.get("failures") else []
    if calls.get("missing_logprobs"):
        parts.append(f"{calls['missing_logprobs']} of {calls['requests']} without log-probs")
    return lead + ", ".join(parts)
