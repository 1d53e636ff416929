"""The points a tuning has scored so far, kept on disk so that an interrupted tuning resumes.

``trime-tune-mt`` decodes the tuning sentences once per grid point (a minute or more each on a CPU, dozens of
points per grid): a tuning that is stopped half-way should not start again from nothing. A :class:`ScoreLog`
is a JSON-lines file: a header line naming what the scores depend on besides the point's own options (the
checkpoint, the split, the sentences, the decoding settings), then one line per scored point, appended and
flushed as soon as the point is scored. Started again with the same arguments, the tuner reads the scores
back and :func:`~trime_fairseq.cli.grid_search.search` skips those points; the grid may differ (a point is
reused only where its options are equal). A log written by another tuning (its header differs) is an error,
never mixed in; a last line cut by the interruption is dropped. The tuner removes the log once its results
are written.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Mapping

from trime_fairseq.atomic import atomic_write_text
from trime_fairseq.memory.options import MemoryOptions


class ScoreLog:
    def __init__(self, path, identity: Mapping[str, object]):
        self.path = Path(path)
        self.header = json.dumps({"score_log": dict(identity)}, sort_keys=True)

    def load(self) -> Dict[MemoryOptions, float]:
        """The scores logged so far (empty, and a fresh log with this run's header, when there is none)."""
        if not self.path.exists():
            atomic_write_text(self.path, self.header + "\n")
            return {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        if lines[0] != self.header:
            try:
                theirs = json.loads(lines[0])["score_log"]
            except (json.JSONDecodeError, KeyError, TypeError):
                theirs = {}
            ours = json.loads(self.header)["score_log"]
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ValueError(f"{self.path} holds the scores of another tuning (it differs in: "
                             f"{', '.join(differ) or 'its header'}); remove it, or rerun with the arguments that "
                             "wrote it")
        scores, kept = {}, [lines[0]]
        body = [line for line in lines[1:] if line]
        for n, line in enumerate(body):
            try:
                record = json.loads(line)
                opt = MemoryOptions(**record["options"])
                score = float(record["score"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if n == len(body) - 1 and lines[-1]:
                    break  # the last line lacks its newline: an append cut by the interruption, dropped
                raise ValueError(f"{self.path}: line {n + 2} is not a scored point ({e}): remove the file") from e
            scores[opt] = score
            kept.append(line)
        if len(kept) != len(body) + 1:
            atomic_write_text(self.path, "\n".join(kept) + "\n")
        return scores

    def append(self, opt: MemoryOptions, score: float) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"options": asdict(opt), "score": score}, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
