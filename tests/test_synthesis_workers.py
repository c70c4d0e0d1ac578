"""Anomaly synthesis in DataLoader workers (distillad.synthesis.workers) and the models that use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch, ImageItem
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from distillad.synthesis import (
    AnomalySynthesizer,
    KeyedDataset,
    SynthesisBatchSampler,
    SynthesisPlan,
    SynthesizingCollate,
    take_synthesis,
)

SIZE = 32


class Discs(Dataset):
    """Bright discs on black at different places, with paths as keys."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> ImageItem:
        rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
        disc = ((rows - 10 - index) ** 2 + (cols - 16) ** 2 <= 64).float()
        return ImageItem(image=torch.stack([0.8 * disc, 0.7 * disc, 0.9 * disc]), image_path=f"disc{index}.png")


def plan(cache_dir: Path) -> SynthesisPlan:
    synthesizers = {"whole": AnomalySynthesizer(foreground="none", seed=0),
                    "objects": AnomalySynthesizer(foreground="threshold", seed=1)}
    synthesizers["objects"].foregrounds.cache_dir = cache_dir
    return SynthesisPlan(synthesizers, active={"whole"})


def loader(synthesis: SynthesisPlan, seed: int, workers: int = 2, dataset: Dataset | None = None) -> DataLoader:
    dataset = dataset or Discs()
    generator = torch.Generator().manual_seed(seed)
    batches = SynthesisBatchSampler(RandomSampler(dataset, generator=generator), 4, drop_last=False,
                                    generator=generator, plan=synthesis)
    return DataLoader(KeyedDataset(dataset), batch_sampler=batches, num_workers=workers,
                      persistent_workers=workers > 0, collate_fn=SynthesizingCollate(ImageBatch.collate, synthesis))


def batches(synthesis: SynthesisPlan, seed: int, workers: int = 2) -> list[ImageBatch]:
    return list(loader(synthesis, seed, workers))


def test_the_data_side_synthesises_the_active_synthesizers_alike_with_any_workers(tmp_path: Path) -> None:
    synthesis = plan(tmp_path)
    states = {name: s.generator.get_state() for name, s in synthesis.synthesizers.items()}
    in_workers, again, other = batches(synthesis, 0), batches(synthesis, 0), batches(synthesis, 1)
    for name, synthesizer in synthesis.synthesizers.items():  # drawn in the workers: the originals are untouched
        assert torch.equal(synthesizer.generator.get_state(), states[name])
    in_process = batches(synthesis, 0, workers=0)
    for batch in in_workers:
        assert set(batch.synthesis) == {"whole"}  # only the active synthesizer runs
        made = batch.synthesis["whole"]
        mask = made.mask.bool().expand_as(batch.image)
        assert made.mask.flatten(1).any(dim=1).all()  # every image got an anomaly (probability 1)
        torch.testing.assert_close(made.anomalous[~mask], batch.image[~mask])  # untouched outside the mask
        assert not torch.allclose(made.anomalous[mask], batch.image[mask])
    assert not torch.equal(in_workers[0].synthesis["whole"].mask, in_workers[1].synthesis["whole"].mask)
    for run in (again, in_process):  # same seed: same batches and anomalies, in workers or not
        assert [b.image_path for b in run] == [b.image_path for b in in_workers]
        torch.testing.assert_close([b.synthesis["whole"].anomalous for b in run],
                                   [b.synthesis["whole"].anomalous for b in in_workers], rtol=0, atol=0)
    by_path = {p: m for b in in_workers for p, m in zip(b.image_path, b.synthesis["whole"].mask, strict=True)}
    other_masks = {p: m for b in other for p, m in zip(b.image_path, b.synthesis["whole"].mask, strict=True)}
    assert any(not torch.equal(by_path[path], other_masks[path]) for path in by_path)  # another seed: other draws


def test_each_epoch_of_a_persistent_loader_draws_new_anomalies(tmp_path: Path) -> None:
    epochs = loader(plan(tmp_path), 0)
    first, second = ({p: m for b in epochs for p, m in zip(b.image_path, b.synthesis["whole"].mask, strict=True)}
                     for _ in range(2))
    assert any(not torch.equal(first[path], second[path]) for path in first)


def test_the_plan_chooses_what_the_next_batches_carry(tmp_path: Path) -> None:
    synthesis = plan(tmp_path)
    epochs = loader(synthesis, 0)
    with synthesis.using("objects"):
        objects = list(epochs)
    assert all(set(batch.synthesis) == {"objects"} for batch in objects)
    made = objects[0].synthesis["objects"]
    image = objects[0].image
    assert not (made.mask.bool() & (image.sum(dim=1, keepdim=True) == 0)).any()  # inside the discs only
    assert len(made.foregrounds) == len(image)  # the workers' foregrounds travel back
    assert len(list(tmp_path.glob("*.npy"))) == len(Discs())  # and were saved for later workers
    assert all(set(batch.synthesis) == {"whole"} for batch in epochs)  # restored after the block
    synthesis.pause("whole")
    assert not any(hasattr(batch, "synthesis") for batch in batches(synthesis, 0, workers=0))


def test_synthesizers_of_one_batch_draw_independently() -> None:
    twins = SynthesisPlan({name: AnomalySynthesizer(foreground="none", seed=0) for name in ("a", "b")})
    batch = batches(twins, 0, workers=0)[0]
    assert set(batch.synthesis) == {"a", "b"}
    assert not torch.equal(batch.synthesis["a"].mask, batch.synthesis["b"].mask)


def test_ranks_draw_other_anomalies_than_each_other(tmp_path: Path) -> None:
    synthesis, dataset = plan(tmp_path), Discs()
    masks = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        batch_sampler = SynthesisBatchSampler(sampler, 4, False, torch.Generator().manual_seed(0), synthesis)
        first = next(iter(DataLoader(KeyedDataset(dataset), batch_sampler=batch_sampler,
                                     collate_fn=SynthesizingCollate(ImageBatch.collate, synthesis))))
        masks.append(first.synthesis["whole"].mask)
    assert not torch.equal(masks[0], masks[1])


def test_take_synthesis_uses_the_data_sides_anomalies_or_makes_its_own(tmp_path: Path) -> None:
    synthesis = plan(tmp_path)
    with synthesis.using("objects"):
        batch = batches(synthesis, 0)[0]
    objects = synthesis.synthesizers["objects"]
    state = objects.generator.get_state()
    images = batch.image.double()
    result = take_synthesis(batch, "objects", objects, images, batch.image_path)
    assert torch.equal(objects.generator.get_state(), state)  # nothing drawn here
    assert result.anomalous.dtype == torch.float64 and result.normal is images
    torch.testing.assert_close(result.anomalous, batch.synthesis["objects"].anomalous.double())
    assert len(objects.foregrounds) == len(images)  # the worker's foregrounds are in the model's cache now
    assert objects.foregrounds.whole_image_share() == 0.0
    own = take_synthesis(batch, "whole", synthesis.synthesizers["whole"], batch.image, batch.image_path)
    assert own.mask.flatten(1).any(dim=1).all()  # not made by the data side: synthesised here
    resized = take_synthesis(batch, "objects", objects, batch.image[..., :16, :16], batch.image_path)
    assert resized.mask.shape[-2:] == (16, 16)  # the worker's anomalies no longer fit: made here
    assert not torch.equal(objects.generator.get_state(), state)


def _fit(shared_data: Path, model_name: str, workers: int, **trainer_options):
    from lightning.pytorch import Trainer

    from distillad.pipeline import RunConfig, build_datamodule, build_model

    options = {"stage1_epochs": 1, "stage2_epochs": 1} if model_name == "aand" else {}
    config = RunConfig(model=model_name, model_options=options, pretrained=False, image_size=64, batch_size=4,
                       num_workers=workers, data={"kind": "mvtec_ad", "root": str(shared_data), "category": "weld"})
    torch.manual_seed(0)
    model, datamodule = build_model(config), build_datamodule(config, train_limit=8, test_limit=4)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, **trainer_options)
    trainer.fit(model, datamodule=datamodule)
    return model


def _fresh_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


@pytest.mark.slow
def test_dmdd_takes_both_syntheses_from_its_workers_and_learns_as_without(shared_data: Path) -> None:
    model = _fit(shared_data, "dmdd", workers=2, max_epochs=2)
    assert torch.equal(model.synthesizer.generator.get_state(), _fresh_state(0))  # drawn in workers only
    assert torch.equal(model.fas_synthesizer.generator.get_state(), _fresh_state(1))
    assert model.synthesis_plan.active == {"synthesizer"}  # the MSN epoch's switch to FAS is undone
    assert model.fas_synthesizer.foregrounds.whole_image_share() is not None  # the FAS report sees them
    in_process = _fit(shared_data, "dmdd", workers=0, max_epochs=2)
    assert not torch.equal(in_process.synthesizer.generator.get_state(), _fresh_state(0))
    for trained, reference in ((model.model.msn, in_process.model.msn), (model.model.pmn, in_process.model.pmn)):
        for with_workers, without in zip(trained.parameters(), reference.parameters(), strict=True):
            assert np.array_equal(with_workers.detach().numpy(), without.detach().numpy())


@pytest.mark.slow
def test_aand_synthesises_in_workers_from_its_first_epoch_and_stops_in_stage_two(shared_data: Path) -> None:
    model = _fit(shared_data, "aand", workers=2, max_epochs=2)
    synthesizer = model.synthesizer_for(torch.empty(0))
    assert model.synthesis_plan.synthesizers["synthesizer"] is synthesizer
    assert torch.equal(synthesizer.generator.get_state(), _fresh_state(0))  # drawn in workers only
    assert model.synthesis_plan.active == frozenset()  # paused when the distillation stage began


def test_collect_makes_one_pass_over_its_loader() -> None:
    from anomalib.data import InferenceBatch

    from distillad.pipeline import collect

    class CountingLoader(DataLoader):
        passes = 0

        def __iter__(self):
            CountingLoader.passes += 1  # with workers, each pass starts (and with persistence, prefetches) anew
            return super().__iter__()

    class Scorer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = lambda images: InferenceBatch(pred_score=images.mean(dim=(1, 2, 3)),
                                                       anomaly_map=images.mean(dim=1, keepdim=True))

        @staticmethod
        def model_inputs(images: torch.Tensor) -> torch.Tensor:
            return images

    predictions = collect(Scorer(), CountingLoader(Discs(), batch_size=4, collate_fn=ImageBatch.collate), "scoring")
    assert CountingLoader.passes == 1
    assert len(predictions.paths) == len(Discs())
