"""What a person reads while and after a run: no ETA from the first (compiling) step, a bar for the
evaluations, and the before/after GIF labelled with the step and mean reward of each side."""

from __future__ import annotations

import torch

from ddrl_scale.train.evaluate import evaluate
from ddrl_scale.train.progress import StepProgress


def test_the_first_step_says_compiling_and_gives_no_eta(capsys):
    progress = StepProgress(total=100, initial=0, enabled=True, kernel_backend="compile")
    assert "compiling kernels" in str(progress.bar)
    progress.step(reward="0.500")
    # a plain bar would now extrapolate the first step's compile time over 99 steps
    rendered = str(progress.bar)
    assert progress.bar.n == progress.bar.initial == 1 and "<?" in rendered, rendered
    progress.step(reward="0.510")  # from the second step on: a rate, hence an ETA
    assert "<?" not in str(progress.bar) and "reward=0.510" in str(progress.bar)
    progress.close()
    assert StepProgress(10, 0, True, "torch").bar.postfix.startswith("first step")


def test_a_resumed_run_counts_from_its_step(capsys):
    progress = StepProgress(total=10, initial=4, enabled=True, kernel_backend="triton")
    progress.step()
    assert (progress.bar.n, progress.bar.initial) == (5, 5)
    progress.close()


def test_the_evaluation_shows_a_bar_over_its_denoising_steps(capsys):
    class Rewards:
        def __call__(self, videos, prompts):
            return {"mean": videos.mean(dim=(1, 2, 3, 4))}

        def total(self, scores):
            return scores["mean"]

    sigmas = torch.linspace(1.0, 0.0, 6)  # 5 denoising steps
    result = evaluate(lambda x, sigma, text: -x, lambda prompts: torch.zeros(len(prompts), 2, 4),
                      lambda latents: latents[:, :3].clamp(0, 1), Rewards(), ["a", "b"], 1,
                      (4, 2, 2, 2), sigmas, seed=0, device=torch.device("cpu"),
                      progress="evaluation before")
    assert result.total.shape == (2,)
    err = capsys.readouterr().err
    assert "evaluation before" in err and "5/5" in err
    evaluate(lambda x, sigma, text: -x, lambda prompts: torch.zeros(len(prompts), 2, 4),
             lambda latents: latents[:, :3].clamp(0, 1), Rewards(), ["a"], 1, (4, 2, 2, 2), sigmas,
             seed=0, device=torch.device("cpu"))
    assert capsys.readouterr().err == ""  # no label: no bar


def test_the_before_after_gif_says_which_side_is_which(tmp_path):
    import numpy as np
    from PIL import Image

    from ddrl_scale.train.report import before_after_gif

    before, after = torch.zeros(4, 3, 2, 8, 8), torch.ones(4, 3, 2, 8, 8)  # black, then white videos
    plain = np.asarray(Image.open(before_after_gif(before, after, tmp_path / "plain.gif", 2)).convert("L"))
    path = before_after_gif(before, after, tmp_path / "labelled.gif", 2,
                            labels=("before: step 0, reward 0.479", "after: step 40, reward 0.564"))
    with Image.open(path) as gif:
        frame = np.asarray(gif.convert("L"))
    band = frame.shape[0] - plain.shape[0]
    assert band > 8  # a band above the grids holds the labels
    header = frame[:band]
    spacer = np.flatnonzero((frame[band:] == 255).all(axis=0))  # the white columns between the grids
    middle = spacer[len(spacer) // 2]
    # dark text in the band on both sides: the after side's grid is white, so only text is dark there
    assert (header[:, :middle] < 128).any() and (header[:, middle:] < 128).any()
    assert (frame[band:, middle + 10:] > 128).all()  # the after grid itself: white videos
