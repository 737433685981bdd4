"""Train the project's small DeiT-style ViT from scratch on Fashion-MNIST (60k train images).

    python benchmarks/train_fmnist_vit.py [--epochs 10] [--out PATH]

Architecture: igq_plugin.bench.zoo.FMNIST_VIT (28x28 gray, 4x4 patches, width 96, 6 blocks, 3 heads).
Recipe: AdamW (lr 2e-3, weight decay 0.05), batch 128, 1 warm-up epoch then cosine decay,
label smoothing 0.1, random 2-pixel shifts and horizontal flips. Seeded; the checkpoint (with
its test top-1 and the recipe) is written to the user cache directory unless --out is given.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from igq_plugin.bench.data import fashion_mnist
from igq_plugin.bench.zoo import FMNIST_VIT, build_fmnist_vit, fmnist_input, fmnist_vit_checkpoint, save_atomic


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding) and horizontal flips, per image."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(28).view(1, 28)).view(n, 1, 28, 1).expand(n, 1, 28, 32)
    out = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(28).view(1, 28)).view(n, 1, 1, 28).expand(n, 1, 28, 28)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((model(fmnist_input(images[i:i + batch])).argmax(1) == labels[i:i + batch]).sum())
    return 100.0 * correct / len(images)


def train(epochs: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, limit: int | None = None,
          progress: bool = True) -> tuple[torch.nn.Module, dict]:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    if limit is not None:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    model = build_fmnist_vit()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    t0 = time.time()
    history = []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress)
        for step in bar:
            idx = perm[step * batch_size:(step + 1) * batch_size]
            x = augment(fmnist_input(x_train[idx]), gen)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "test_top1": acc, "seconds": round(time.time() - t0, 1)})
        print(f"epoch {epoch + 1}: test top-1 {acc:.2f}% ({time.time() - t0:.0f} s)", flush=True)
    info = {"arch": FMNIST_VIT, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_images": len(x_train), "test_images": len(x_test), "test_top1": history[-1]["test_top1"],
            "history": history, "torch": str(torch.__version__)}
    return model.eval(), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="checkpoint path (default: the user cache directory)")
    ap.add_argument("--limit", type=int, default=None, help="train/test on the first N images only (smoke runs)")
    args = ap.parse_args()
    model, info = train(args.epochs, limit=args.limit)
    out = args.out or fmnist_vit_checkpoint()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"arch": FMNIST_VIT, "state_dict": model.state_dict(), "info": info}, out)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
