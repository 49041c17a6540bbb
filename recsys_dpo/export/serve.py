"""Serve a recsys-dpo bundle with torch, numpy and faiss only (copied into every bundle as
serve.py; it imports nothing from recsys_dpo).

    python serve.py <bundle dir> <user_id> [k]        top-k of a known user, as JSON
    python serve.py <bundle dir> --history i1 i2 ...  top-10 of a raw history (oldest first)

`Recommender(path).recommend(user_id or history, k)` embeds the user with the exported tower
(user_tower.pt2), searches the faiss index and leaves out the history's items as the bundle's
seen policy (manifest "seen") says: the evaluated top-K (topk.parquet) exactly. Every file it
loads must match its sha256 in manifest.json.
"""

import hashlib
import json
import sys
from pathlib import Path

import faiss  # numpy comes with faiss and torch
import torch

FILES = ("user_tower.pt2", "index.faiss", "vocab.json", "histories.json")


class BundleError(ValueError):
    """A bundle file that is missing or changed, or a query the model cannot answer."""


class Recommender:
    def __init__(self, path: str | Path, check: bool = True) -> None:
        path = Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        for name in FILES if check else ():
            digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
            if digest != manifest["files"][name]["sha256"]:
                raise BundleError(f"{path / name}: sha256 differs from {path / 'manifest.json'}")
        self.seen, self.serving = manifest["seen"], manifest["serving"]
        self.tower = torch.export.load(path / "user_tower.pt2").module()
        self.index = faiss.read_index(str(path / "index.faiss"))
        vocab = json.loads((path / "vocab.json").read_text())
        self.item_ids = vocab["items"]
        self.histories = json.loads((path / "histories.json").read_text())
        self.item_idx = {item: idx for idx, item in enumerate(self.item_ids) if idx}
        self.user_idx = {user: idx for idx, user in enumerate(vocab["users"])}

    @torch.no_grad()
    def recommend(self, query: str | list[str], k: int = 10) -> list[tuple[str, float]]:
        """Top-k (item_id, score) for a known user_id (its stored history) or a history of item
        ids (oldest first; unknown ids ignored); ties by the item's index, as evaluated."""
        if isinstance(query, str):
            if query not in self.user_idx:
                raise BundleError(f"unknown user_id {query!r} (not in vocab.json); pass a history")
            user, history = self.user_idx[query], self.histories.get(query, [])
        elif self.serving["embeds_user_ids"]:
            raise BundleError("this model embeds user ids, so it cannot score a bare history")
        else:
            user, history = 0, list(query)
        known = [self.item_idx[i] for i in history if i in self.item_idx]
        max_len = self.serving["max_len"]
        tail = known[-max_len:]
        context = torch.tensor([[0] * (max_len - len(tail)) + tail])
        vector = self.tower(torch.tensor([user]), context).float().numpy()
        removed = set(known) if self.seen == "remove" else set()
        k, n = min(k, self.index.ntotal), self.index.ntotal
        wanted = min(k + len(removed) + 1, n)  # one spare: a tie at the k-th place shows on it
        while True:
            scores, positions = self.index.search(vector, wanted)
            ranked = sorted((-s, p + 1) for s, p in zip(scores[0], positions[0], strict=True)
                            if p >= 0 and p + 1 not in removed)[:k]  # fmt: skip
            tied = len(ranked) < k or -ranked[-1][0] == scores[0][-1]
            if wanted == n or not tied:
                return [(self.item_ids[i], float(-s)) for s, i in ranked]
            wanted = min(2 * wanted, n)


if __name__ == "__main__":
    served = Recommender(sys.argv[1])
    if sys.argv[2] == "--history":
        print(json.dumps(served.recommend(sys.argv[3:])))
    else:
        k = int(sys.argv[3]) if len(sys.argv) > 3 else 10
        print(json.dumps(served.recommend(sys.argv[2], k)))
