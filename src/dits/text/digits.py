"""The digits-text check (``dits train --preset digits-text``): does the model do what the prompt says?

From samples of a text model trained on the built-in digits' captions (:mod:`dits.data.captions`):

* **prompted-class accuracy** per phrasing: ``per_prompt`` samples for each of the ten prompts of
  a phrasing ("a handwritten {word}", "the digit {numeral}", and one never seen in training,
  "the number {word}"), classified by the digits metric's MLP (and the independent SVC); the
  fraction classified as the prompted digit;
* **realism and diversity**: the digits metric's held-out Fréchet distance ratio (1x = as close to
  held-out real digits as fresh real digits) of the two trained phrasings' samples;
* **stroke weight**: for every class, the mean ink (mean pixel value) of the samples of
  "a bold handwritten {word}" over that of "a thin handwritten {word}"; the same ratio for the
  real training images the two captions were given to is the reference.
"""
from __future__ import annotations

import numpy as np

from dits.data.captions import DIGITS_TEMPLATES, NUMBER_WORDS

PHRASINGS = {"plain": DIGITS_TEMPLATES[0], "digit": DIGITS_TEMPLATES[1], "unseen": "the number {word}"}
BOLD, THIN = DIGITS_TEMPLATES[2], DIGITS_TEMPLATES[3]


def prompts_of(template: str) -> list[str]:
    return [template.format(word=w, numeral=i) for i, w in enumerate(NUMBER_WORDS)]


def mean_ink(images: np.ndarray) -> np.ndarray:
    """Per image, the mean pixel value in [0, 1] (uint8 N x H x W[ x 1])."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    return x.reshape(len(x), -1).mean(1)


def real_ink_ratio() -> list[float]:
    """Per class, mean ink of the training digits captioned bold over those captioned thin."""
    from dits.data.builtin import builtin
    from dits.data.captions import stroke_thirds

    x, y = builtin("digits", "train")
    w = stroke_thirds(x, y).numpy()
    ink = ((x.numpy() + 1) / 2).reshape(len(x), -1).mean(1)
    y = y.numpy()
    return [float(ink[(y == c) & (w > 0)].mean() / ink[(y == c) & (w < 0)].mean()) for c in range(10)]


def accuracy(images: np.ndarray, labels: np.ndarray) -> dict:
    from dits.evaluate.digits import load_classifier, svc_accuracy, to_inputs

    pred = load_classifier().predict(to_inputs(images))
    per_class = [float((pred[labels == c] == c).mean()) for c in range(10)]
    return {"accuracy": float((pred == labels).mean()), "svc_accuracy": float(svc_accuracy(images, labels)),
            "per_class": per_class}


def digits_text_report(model, per_prompt: int = 50, seed: int = 0, **sampling) -> dict:
    """The check above on ``model`` (``sampling``: :func:`dits.sample.generate`'s sampler, steps,
    cfg_scale, device, ...). Sample i of prompt p uses seed ``seed + p * per_prompt + i`` within
    each prompt set, so sets do not share noise with each other (offsets of 10,000)."""
    from dits.sample import generate, grid_labels

    labels = grid_labels(10, per_prompt).numpy()
    out = {"per_prompt": per_prompt, "phrasings": {}}
    for k, (name, template) in enumerate(PHRASINGS.items()):
        imgs, _ = generate(model, 10 * per_prompt, prompts=prompts_of(template), labels=grid_labels(10, per_prompt),
                           seed=seed + 10_000 * k, batch_size=500, **sampling)
        out["phrasings"][name] = {"template": template, **accuracy(imgs, labels)}
        if name != "unseen":  # how close to real digits (diversity too): the digits metric's held-out FD ratio
            from dits.evaluate.digits import digits_metric

            m = digits_metric(imgs, labels, seed=seed)
            out["phrasings"][name]["fd_heldout_ratio"] = float(m["fd_heldout"] / m["fd_heldout_floor"])
    inks = {}
    for k, template in enumerate((BOLD, THIN)):
        imgs, _ = generate(model, 10 * per_prompt, prompts=prompts_of(template), labels=grid_labels(10, per_prompt),
                           seed=seed + 10_000 * (len(PHRASINGS) + k), batch_size=500, **sampling)
        ink = mean_ink(imgs)
        inks[template] = [float(ink[labels == c].mean()) for c in range(10)]
        out["phrasings"]["bold" if template == BOLD else "thin"] = {"template": template, **accuracy(imgs, labels)}
    ratio = [b / t for b, t in zip(inks[BOLD], inks[THIN])]
    out["ink"] = {"bold": inks[BOLD], "thin": inks[THIN], "ratio": ratio, "min_ratio": float(min(ratio)),
                  "real_ratio": real_ink_ratio()}
    return out


def format_report(r: dict) -> str:
    """One line: accuracy per phrasing, then the smallest bold/thin ink ratio over the classes."""
    acc = ", ".join(f"{name} {100 * p['accuracy']:.1f}%" for name, p in r["phrasings"].items())
    fd = r["phrasings"]["plain"].get("fd_heldout_ratio")
    if fd is not None:
        acc += f" | held-out FD ratio (plain) {fd:.2f}x"
    ink = r["ink"]
    return (f"digits-text {r['per_prompt']}/prompt: prompted-class accuracy {acc} | bold/thin ink ratio min "
            f"{ink['min_ratio']:.2f} (real {min(ink['real_ratio']):.2f}), mean {np.mean(ink['ratio']):.2f}")
