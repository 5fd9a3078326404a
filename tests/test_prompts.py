"""Evaluation prompt sets and prompt fidelity."""

import numpy as np
import pytest
import torch

from ldmkit.config import TrainConfig
from ldmkit.data.shapes import parse_prompt, render_scene, scene_from_spec
from ldmkit.data.transforms import pil_to_tensor
from ldmkit.errors import UserError
from ldmkit.evaluation.judge import judge_images, load_judge
from ldmkit.evaluation.prompts import PROMPT_SETS, fidelity, prompt_matches, prompt_set

HELDOUT = {("purple", "triangle"), ("orange", "circle")}


def pairs(prompt):
    return {(o.color, o.shape) for o in parse_prompt(prompt).objects}


def render_prompts(prompts, seed=0):
    rng = np.random.default_rng(seed)
    scenes = [scene_from_spec(parse_prompt(p), rng) for p in prompts]
    return torch.stack([pil_to_tensor(render_scene(s, 64, rng)) for s in scenes])


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_prompt_sets_have_the_requested_size_parse_and_repeat_for_a_seed(name):
    prompts = prompt_set(name, 200, seed=3)
    assert len(prompts) == 200
    assert prompts == prompt_set(name, 200, seed=3)
    assert prompts != prompt_set(name, 200, seed=4)
    for p in prompts:
        parse_prompt(p)  # raises on anything the parser cannot read
    assert not set(prompts) & set(TrainConfig().validation_prompts)


def test_single_and_two_object_sets_never_use_a_heldout_pair():
    for name in ("single", "two"):
        assert not any(pairs(p) & HELDOUT for p in prompt_set(name, 300, seed=0))


def test_heldout_set_states_a_heldout_colour_and_shape_in_every_prompt():
    specs = [parse_prompt(p) for p in prompt_set("heldout", 200, seed=0)]
    assert all(len(s.objects) == 1 for s in specs)
    found = {(s.objects[0].color, s.objects[0].shape) for s in specs}
    assert found == HELDOUT
    assert {s.objects[0].size for s in specs} >= {"small", "large"}
    assert len({s.objects[0].position for s in specs} - {None}) == 5


def test_single_prompts_mostly_state_colour_and_shape_and_often_size_or_position():
    objs = [parse_prompt(p).objects for p in prompt_set("single", 400, seed=0)]
    assert all(len(o) == 1 for o in objs)
    objs = [o[0] for o in objs]
    assert sum(o.color is not None and o.shape is not None for o in objs) >= 0.8 * len(objs)
    assert sum(o.size is not None for o in objs) >= 0.4 * len(objs)
    assert sum(o.position is not None for o in objs) >= 0.4 * len(objs)


def test_two_object_prompts_state_a_relation_and_both_colours_and_shapes():
    specs = [parse_prompt(p) for p in prompt_set("two", 300, seed=0)]
    assert all(s.relation is not None and len(s.objects) == 2 for s in specs)
    assert all(o.color and o.shape for s in specs for o in s.objects)
    assert {s.relation for s in specs} == {"left of", "right of", "above", "below"}


def test_validation_prompts_are_excluded_even_when_drawn():
    prompts = prompt_set("single", 300, seed=0, exclude=["a red circle", "A blue square"])
    assert "a red circle" not in prompts and "a blue square" not in prompts
    assert "a red circle" in prompt_set("single", 300, seed=0, exclude=[])


def test_unknown_prompt_set_is_a_user_error():
    with pytest.raises(UserError, match="prompt set 'triple'"):
        prompt_set("triple", 5, seed=0)


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_real_images_of_each_prompt_score_full_fidelity_and_mismatched_prompts_low(name):
    judge = load_judge()
    prompts = prompt_set(name, 60, seed=11)
    judged = judge_images(judge, render_prompts(prompts))
    assert fidelity(judged, prompts) == 1.0
    shifted = prompts[1:] + prompts[:1]  # each image judged against another image's prompt
    assert fidelity(judged, shifted) < 0.35


def test_fidelity_needs_one_prompt_per_image():
    with pytest.raises(ValueError, match="2 judged scenes for 1 prompts"):
        prompt_matches([None, None], ["a red circle"])


def test_the_headline_samplers_other_step_counts_get_as_many_paired_images_as_the_headline():
    from ldmkit.diffusion.registry import HEADLINE
    from ldmkit.evaluation.fidelity import standard_entries

    entries = standard_entries(200, 100, 500)
    rows = {(e.prompt_set, e.sampler, e.steps, e.guidance, e.guidance_rescale): e.n
            for e in entries}
    head = (HEADLINE.sampler, HEADLINE.steps, HEADLINE.guidance)
    phi = HEADLINE.guidance_rescale
    assert phi > 0
    assert rows[("single", *head, phi)] == 200
    assert rows[("single", HEADLINE.sampler, 10, HEADLINE.guidance, phi)] == 200
    assert rows[("single", "ddim", 10, HEADLINE.guidance, phi)] == 100
    assert rows[("single", HEADLINE.sampler, HEADLINE.steps, 1.0, phi)] == 100
    # plain CFG beside the headline on every set, paired with it
    assert all(rows[(s, *head, 0.0)] == 200 for s in ("single", "two", "heldout"))
    assert len(rows) == len(entries)  # no setting measured twice
