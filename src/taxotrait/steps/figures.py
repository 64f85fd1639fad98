"""Steps of workflow/rules/figures.smk: each rank's trait galleries and shared traits, and each species' coarse-to-fine
figure, drawn by the job's threads (`taxotrait.figures.FigurePool`)."""

from __future__ import annotations

from collections.abc import Mapping

from .. import figures as figure_makers


def figure_settings(settings: Mapping) -> figure_makers.FigureSettings:
    """The FigureSettings of `figures` and `augment.resize`."""
    f = settings["figures"]
    return figure_makers.FigureSettings(int(settings["augment"]["resize"]), int(f["gallery_images"]),
                                        int(f["max_heads"]), int(f["report_galleries"]))


def figures(rank: str, inputs: Mapping, outputs: Mapping, settings: Mapping, workers: int = 1) -> None:
    """<rank>/figures: a trait gallery per taxon and the shared-traits figure (`workers` drawing processes), the
    report's selection of them and their index page."""
    figure_makers.rank_figures(rank, inputs["attention"], inputs["traits"], inputs["manifest"], outputs["figures"],
                               figure_settings(settings), workers=workers)


def hierarchy_figures(inputs: Mapping, outputs: Mapping, settings: Mapping, workers: int = 1) -> None:
    """figures/hierarchy: every species' traits at every rank (`ranks`, coarse to fine) on one of its images
    (`workers` drawing processes), the report's selection of them and their index page."""
    ranks = list(settings["ranks"])
    figure_makers.hierarchy_figures(dict(zip(ranks, inputs["attention"])), inputs["hierarchy"], inputs["manifest"],
                                    outputs["figures"], ranks, figure_settings(settings), workers=workers)
