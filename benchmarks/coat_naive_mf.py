"""A diagnostic outside the pipeline: can a plain naive MF in the published code's form reach
the published Coat AUC (naive MF 0.7429, Ha et al., NeurIPS 2024, Table 2)?

The DR-JL / MRDR / TDR-CL code family's naive model: MF without biases, embedding_k=4,
Adam lr 0.05, batch 128, BCE on every rating of train.ascii (all of it, no valid slice),
label rating >= threshold, an L2 term of weight `lamb`; the pooled AUC over all test.ascii
rows (`roc_auc_score(y_test, pred)`) printed at a few epochs. One fixed setting per call and
no selection on test: it only says how far such a model gets, not a recipe.

    python benchmarks/coat_naive_mf.py /work/shared/data/coat 3 1e-4 0   # dir, threshold, lamb, seed
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from recsys_dpo.evaluation.metrics import global_auc


def main(coat: str, threshold: float, lamb: float, seed: int) -> None:
    train, test = np.loadtxt(f"{coat}/train.ascii"), np.loadtxt(f"{coat}/test.ascii")
    u, i = np.nonzero(train)
    tu, ti = np.nonzero(test)
    y = torch.tensor(train[u, i] >= threshold, dtype=torch.float32)
    test_y = test[tu, ti] >= threshold
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(train.shape[0], 4) * 0.1)
    q = torch.nn.Parameter(torch.randn(train.shape[1], 4) * 0.1)
    opt = torch.optim.Adam([p, q], lr=0.05)
    users, items = torch.from_numpy(u), torch.from_numpy(i)
    for epoch in range(1, 101):
        order = torch.randperm(len(users))
        for start in range(0, len(order), 128):
            b = order[start : start + 128]
            pu, qi = p[users[b]], q[items[b]]
            l2 = lamb * (pu.pow(2).sum() + qi.pow(2).sum()) / len(b)
            loss = F.binary_cross_entropy_with_logits((pu * qi).sum(1), y[b]) + l2
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch in (5, 10, 20, 50, 100):
            with torch.no_grad():
                scores = (p[tu] * q[ti]).sum(1).numpy()
            auc = global_auc(scores, test_y)
            print(f"rating >= {threshold:g}, lamb {lamb:g}, epoch {epoch}: pooled AUC {auc:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
