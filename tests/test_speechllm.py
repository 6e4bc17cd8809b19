"""SpeechLLM on the micro dev model: instruction injection, the three paths, bundle round trip."""

from __future__ import annotations

import functools
import json
import random
import shutil
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LogitsProcessorList, WhisperForConditionalGeneration

from wyoming_tinyalign.corpus import generate_commands
from wyoming_tinyalign.devmodel import ALIGN_EMBEDLINK_WEIGHT
from wyoming_tinyalign.households import context_text, load_households
from wyoming_tinyalign.intents import NOT_RECOGNIZED, SEP, parse_intent
from wyoming_tinyalign.manifest import load_utterances
from wyoming_tinyalign.model.biasing import NAME_BONUS, NameBias
from wyoming_tinyalign.model.bundle import (
    BundleError,
    load_bundle_config,
    load_projector,
    save_bundle_config,
)
from wyoming_tinyalign.model.slots import (
    ANY_NUMBER,
    NUMBER_SLOTS,
    IntentGrammar,
    heard,
    line_fits,
    numbers,
    slot_values,
)
from wyoming_tinyalign.model.speechllm import (
    PATHS,
    SpeechLLM,
    load_llm,
    loop_start,
    whisper_prompt,
    whisper_transcript,
)


@pytest.fixture(scope="module")
def model(micro_model: Path) -> SpeechLLM:
    return SpeechLLM.load(micro_model)


@pytest.fixture(scope="module")
def audio(base_manifest: Path) -> np.ndarray:
    return load_utterances(base_manifest)[0][1]


def raw_greedy(model: SpeechLLM, embeds: torch.Tensor, context: str | None = None) -> list[int]:
    """The LLM's own greedy answer to `embeds` over the whole prompt (no cached prefix, no loop cut), with
    the intent grammar when a `context` is given."""
    grammar = [IntentGrammar(model.token_texts, context, None)] if context is not None else []
    return model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        max_new_tokens=model.max_new_tokens,
        do_sample=False,
        eos_token_id=model.tokenizer.eos_token_id,
        pad_token_id=model.tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList(grammar),
    )[0].tolist()


def test_instruction_injection_places_audio_where_the_template_says(model: SpeechLLM) -> None:
    content = torch.randn(5, model.llm.config.hidden_size)
    context = "areas: kitchen; devices: porch light"
    embeds, span = model.prompt_embeds(content, context)
    before, after = model.template.split(context)
    assert context in before
    pre, post = model.text_ids(before), model.text_ids(after)
    assert embeds.shape == (1, len(pre) + 5 + len(post), model.llm.config.hidden_size)
    assert span == slice(len(pre), len(pre) + 5)
    torch.testing.assert_close(embeds[0, span], content)
    torch.testing.assert_close(embeds[0, : len(pre)], model.embed_tokens(pre))
    torch.testing.assert_close(embeds[0, span.stop :], model.embed_tokens(post))


def test_every_path_gives_a_result(model: SpeechLLM, audio: np.ndarray) -> None:
    for path in PATHS:
        result = model.run(audio, path, context="areas: kitchen")
        assert result.path == path
        assert isinstance(result.transcript, str)
        assert result.latency_ms > 0
        assert result.intent is None or result.intent.name.startswith("Hass")
    assert model.run(audio, "cascade").confidence <= 0.0


def test_silence_and_empty_audio_give_an_empty_transcript(model: SpeechLLM) -> None:
    for audio in (np.zeros(0, np.float32), np.zeros(16000, np.float32)):
        result = model.run(audio, "aligned")
        assert (result.transcript, result.intent) == ("", None)


def test_loops_are_found_where_they_begin() -> None:
    assert loop_start([7, 1, 2, 3, 3, 3, 3]) == 3
    assert loop_start([7, 3, 3, 3, 3, 3]) == 1
    assert loop_start([7, 1, 2, 1, 2, 1, 2]) == 1
    assert loop_start([4, 5, 6, 4, 5, 6, 4, 5, 6]) == 0
    assert loop_start([1, 0, 0]) is None and loop_start([1, 2, 1, 2]) is None and loop_start([]) is None


def test_a_looping_answer_is_cut_where_the_loop_began(model: SpeechLLM) -> None:
    """Prompts of random embeddings send the tiny LLM into loops; `generate` stops them early and
    returns what came before."""
    torch.manual_seed(0)
    looped = 0
    for _ in range(20):
        embeds = torch.randn(1, 20, model.llm.config.hidden_size) * 0.05
        raw = raw_greedy(model, embeds)
        # where generation stops: the first point at which the answer so far ends in a loop
        stop = next((n for n in range(1, len(raw) + 1) if loop_start(raw[:n]) is not None), len(raw))
        start = loop_start(raw[:stop])
        answer, _ = model.generate(embeds)
        if start is None:
            assert answer == model.tokenizer.decode(raw, skip_special_tokens=True)
        else:
            looped += 1
            assert answer == model.tokenizer.decode(raw[:start], skip_special_tokens=True)
    assert looped, "no prompt looped: the test proves nothing"


def test_answers_start_from_the_cached_prompt_prefix(model: SpeechLLM, audio: np.ndarray) -> None:
    """The prompt before the audio slot runs through the LLM once per household context; answers from
    that cache are the answers of a run over the whole prompt."""
    context = "areas: kitchen, porch; devices: kitchen lamp, porch light"
    embeds, span = model.prompt_embeds(model.project([audio])[0], context)
    model.prefix_cache.cache_clear()
    answers = [model.generate(embeds, context)[0] for _ in range(3)]
    assert (model.prefix_cache.cache_info().misses, model.prefix_cache.cache_info().hits) == (1, 2)
    prefix = model.prefix_cache(context)
    assert prefix.get_seq_length() == span.start  # answering never grows the stored prefix
    # The LLM over the whole prompt, with the same grammar
    whole = raw_greedy(model, embeds, context)
    # an answer that ended, with no loop to cut
    assert whole[-1] == model.tokenizer.eos_token_id and loop_start(whole) is None
    assert answers == [model.tokenizer.decode(whole, skip_special_tokens=True)] * 3
    full = model.llm(inputs_embeds=embeds).logits[0, span.start :]
    cached = model.llm(inputs_embeds=embeds[:, span.start :], cache=deepcopy(prefix)).logits[0]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_the_aligned_confidence_is_the_llms_mean_logprob_of_the_transcript_line(
    model: SpeechLLM, base_manifest: Path
) -> None:
    """An aligned answer's confidence is the mean log-probability the LLM gave the tokens of its
    transcript line (the token that ends the line included), as a run over the whole answer scores them."""
    context = "areas: kitchen, porch; devices: kitchen lamp, porch light"
    lines = 0
    for _, audio in load_utterances(base_manifest)[:4]:
        embeds, _ = model.prompt_embeds(model.project([audio])[0], context)
        whole = raw_greedy(model, embeds, context)
        whole = whole[: loop_start(whole)]
        ends = [i for i, t in enumerate(whole) if "\n" in model.token_texts.texts[t]]
        line = whole[: ends[0] + 1] if ends else whole
        lines += bool(ends)
        answer = torch.cat([embeds, model.embed_tokens(line).unsqueeze(0)], dim=1)
        logits = model.llm(inputs_embeds=answer).logits[0, embeds.shape[1] - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1)[torch.arange(len(line)), line].mean().item()
        result = model.run_features(model.encode(audio), "aligned", context)
        assert result.confidence == pytest.approx(expected, abs=1e-4)
        assert result.confidence < 0
    assert lines, "no answer had a transcript line that ended: the test proves less than it says"
    said = "turn on the porch light"
    embeds, _ = model.prompt_embeds(model.embed_tokens(model.text_ids(said)), context)
    assert model.generate(embeds, context, transcript=said)[1] is None  # no transcript written, none scored


def test_cascade_decoding_steps_one_token_at_a_time_and_gives_the_full_decoding(
    model: SpeechLLM, audio: np.ndarray
) -> None:
    """Whisper's decoder runs on one new token per step (its keys and values cached); the transcript is
    the one re-running the decoder over the whole sequence at every step gives (up to a loop). Random
    weights of a wide spread: their long answers depend on every earlier token (the micro Whisper's short
    ones hardly do)."""
    torch.manual_seed(4)  # (38 tokens, the last 6 a loop that is cut)
    config = deepcopy(model.whisper.config)
    config.init_std = 0.3
    whisper = WhisperForConditionalGeneration(config).eval()
    whisper.generation_config = gen = model.whisper.generation_config
    feats = model.encode(audio)
    ids, banned = whisper_prompt(whisper, model.whisper_tokenizer)
    assert len(ids) == 4  # start, language, task, no timestamps
    start, steps = len(ids), 0
    with torch.no_grad():
        while len(ids) < whisper.config.max_target_positions:
            logits = whisper(encoder_outputs=(feats[None],), decoder_input_ids=torch.tensor([ids])).logits[
                0, -1
            ]
            logits[banned] = -float("inf")
            if int(logits.argmax()) == gen.eos_token_id:
                break
            ids.append(int(logits.argmax()))
            steps += 1
            if (loop := loop_start(ids[start:])) is not None:  # a loop ends it, cut where it began
                del ids[start + loop :]
                break
    assert steps > 10 and len(ids) - start > 10, "a short answer proves little"
    full = " ".join(model.whisper_tokenizer.decode(ids[start:], skip_special_tokens=True).lower().split())
    assert whisper_transcript(whisper, model.whisper_tokenizer, feats)[0] == full


def test_the_name_bias_starts_and_continues_the_households_names(model: SpeechLLM) -> None:
    """Every spelling of every name may start a transcript; after a word, a name starts with a space; a
    name begun at the end of the transcript is continued."""
    tokenize = functools.partial(model.whisper_tokenizer, add_special_tokens=False)
    bias = NameBias.from_context(model.whisper_tokenizer, "areas: sitting room; devices: porch light")
    assert bias is not None
    first = ["sitting room", "Sitting room", " sitting room", " Sitting room", "porch light", " Porch light"]
    later = [" sitting room", " Sitting room", " porch light", " Porch light"]
    room, light = (tokenize(s)["input_ids"] for s in (" sitting room", " porch light"))
    assert len(room) > 1 and len(light) > 1, "one-token names prove nothing about continuing one"
    starts_first, starts_later = ({tokenize(s)["input_ids"][0] for s in group} for group in (first, later))
    assert starts_first <= bias.next_tokens([]) and starts_later <= bias.next_tokens([5])
    unspaced = tokenize("porch light")["input_ids"][0]
    assert unspaced not in starts_later and unspaced not in bias.next_tokens([5])  # not "theporch"
    assert room[1] not in bias.next_tokens([5])
    assert bias.next_tokens([5, *room[:1]]) == {room[1]}  # a name begun after other words goes on
    # The name goes on where its token is within the bonus of the likeliest, not where it is further.
    logprobs = torch.full((model.whisper.config.vocab_size,), -20.0)
    other = next(t for t in range(logprobs.numel()) if t not in bias.next_tokens(room[:1]))
    logprobs[other], logprobs[room[1]] = -1.0, -1.0 - 0.9 * NAME_BONUS
    assert bias.pick(logprobs, room[:1]) == room[1]
    logprobs[room[1]] = -1.0 - 1.1 * NAME_BONUS
    assert bias.pick(logprobs, room[:1]) == other
    assert NameBias.from_context(model.whisper_tokenizer, "") is None
    assert model.name_bias("areas: sitting room; devices: porch light").following == bias.following


def test_the_cascade_writes_a_household_name_its_bias_favours(
    model: SpeechLLM, audio: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a bonus large enough, Whisper writes the household's name where it would not (as many tokens
    as the name takes: it would go on writing it); its confidence stays Whisper's own score of what it
    wrote (so a forced name scores low)."""
    feats = model.encode(audio)
    name = "aquarium pump"
    plain, plain_confidence = whisper_transcript(model.whisper, model.whisper_tokenizer, feats)
    assert name not in plain
    forced = NameBias.from_context(model.whisper_tokenizer, f"areas: ; devices: {name}", bonus=100.0)
    assert forced is not None
    text, confidence = whisper_transcript(
        model.whisper, model.whisper_tokenizer, feats, None, forced.longest, forced
    )
    assert text.startswith(name)
    assert confidence < plain_confidence
    # A request's context reaches the bias: the served path writes the name its context's bias favours.
    context = f"areas: ; devices: {name}"
    monkeypatch.setattr(model, "name_bias", {context: forced}.get)
    served = model.run(audio, "cascade", context, with_intent=False, max_new_tokens=forced.longest)
    assert served.transcript == text and model.run(audio, "cascade", with_intent=False).transcript == plain


CONTEXT = "areas: sitting room, study; devices: aquarium pump, wall sconce"


def _greedy_line(
    model: SpeechLLM, start: str, transcript: str, seed: int, end_after: int | None = None
) -> str:
    """The intent line a greedy decoder writes after `start` on random scores (over a vocabulary padded
    beyond the tokenizer's, as an LLM's often is) through `IntentGrammar`; from `end_after` tokens on,
    ending the answer scores best (before, worst)."""
    grammar = IntentGrammar(model.token_texts, CONTEXT, transcript)
    texts, eos = model.token_texts.texts, model.token_texts.eos_id
    ids = model.tokenizer(start, add_special_tokens=False)["input_ids"]
    generator, written = torch.Generator().manual_seed(seed), []
    while len(written) < 60 and not any("\n" in texts[i] for i in written):
        scores = torch.randn(1, len(texts) + 64, generator=generator)
        if end_after is not None:
            scores[0, eos] = 100.0 if len(written) >= end_after else -100.0
        token = int(grammar(torch.tensor([ids + written]), scores).argmax())
        if token == eos:
            break
        written.append(token)
    return (start + "".join(texts[i] for i in written)).partition("\n")[0]


def _greedy_value(model: SpeechLLM, start: str, transcript: str, seed: int) -> str:
    """The value `_greedy_line` writes after `start` (which opens a slot)."""
    return _greedy_line(model, start, transcript, seed)[len(start) :].partition(SEP)[0]


def test_slot_values_name_the_households_things_or_words_that_were_said(model: SpeechLLM) -> None:
    # A name said is the value; else the one name that shares a word, and runs of words heard after the
    # first (the verb) that do not begin or end with a function word nor begin one of the names.
    names = ["aquarium pump", "heat pump", "wall sconce", "lamp", "bedside lamp"]
    assert slot_values(names, "turn on the aquarium pump please") == ["aquarium pump"]
    assert slot_values(names, "turn on the bedside lamp") == ["bedside lamp"]  # not "lamp"
    cases = {
        "is the wood sconce on": {"wall sconce", "wood", "wood sconce", "sconce"},
        "switch on the pump": {"pump"},  # no guess between two pumps
        "please turn on the garden hose": {"garden", "garden hose", "hose"},  # not "turn"
        "turn on the aquarium": {"aquarium pump"},
    }
    for transcript, values in cases.items():
        assert set(slot_values(names, transcript)) == values, transcript
    # Greedy decoding on random scores keeps to them.
    said = "turn on the garden hose"
    hose = {"garden", "garden hose", "hose"}
    values = [_greedy_value(model, "HassTurnOn | name=", said, seed) for seed in range(12)]
    assert set(values) <= hose and len(set(values)) > 1, values
    for said, values in (
        ("lights on in the study", {"study"}),
        ("lights on in the sitting", {"sitting room"}),
    ):
        areas = [_greedy_value(model, "HassTurnOn | area=", said, seed) for seed in range(12)]
        assert set(areas) <= values, areas
    # Answers before their intent line are left as the LLM writes them.
    slots = IntentGrammar(model.token_texts, CONTEXT, None)
    scores = torch.randn(1, len(model.token_texts.texts))
    ids = torch.tensor([model.tokenizer("turn on the aqu", add_special_tokens=False)["input_ids"]])
    assert torch.equal(slots(ids, scores.clone()), scores)
    # The answer may not end half-way through a name, nor on words that begin one ("aquarium" for the
    # aquarium pump), but may on words that were said and begin none.
    eos = model.tokenizer.eos_token_id
    scores[0, eos] = 100.0
    for answer, ends in (
        ("turn on the pump\nHassTurnOn | name=aqu", False),
        ("turn on the aquarium\nHassTurnOn | name=aquarium", False),
        ("turn on the garden\nHassTurnOn | name=garden", True),
    ):
        ids = torch.tensor([model.tokenizer(answer, add_special_tokens=False)["input_ids"]])
        assert (int(slots(ids, scores.clone()).argmax()) == eos) == ends, answer


def test_the_intent_line_is_one_parse_intent_reads(model: SpeechLLM) -> None:
    # `Intent.to_text`'s form: a known intent or "none"; its own slots, in their fixed order, each once,
    # with a value allowed (here: names, numbers, and any words for other slots).
    def values(slot: str) -> list[str] | None:
        known = {"name": ["aquarium pump", "pump"], "area": ["study"], "brightness": ["40"]}
        return known.get(slot, ["21.5"] if slot == "temperature" else None)

    for line, fits in (
        ("HassTurn", True),
        ("Hass Turn", False),
        ("HassTurnOn |", True),
        ("HassTurnOn  |", False),  # one space
        ("HassTurnOn | area=study | domain=light", True),
        ("HassTurnOn | area=study | area=", False),  # twice
        ("HassTurnOn | domain=light | area", False),  # out of order
        ("HassTurnOn | brightness=", False),  # not HassTurnOn's
        ("HassTurnOn | name=pump ", True),  # ... | area=
        ("HassTurnOn | name=pump|", False),
        ("HassTurnOn | name=aquarium pu", True),
        ("HassTurnOn | name=aquarium pond", False),
        ("HassTurnOn | area=the  study", False),
        ("HassTurnOn | area=study\t", False),
        ("HassLightSet | brightness=4", True),
        ("HassLightSet | brightness=40 |", False),  # nothing may follow
        ("HassLightSet | brightness=5", False),  # not a number the transcript writes
        ("HassClimateSetTemperature | temperature=21.", True),
        ("none |", False),
        ("HassCancelAllTimers |", False),
    ):
        assert line_fits(line, values) == fits, line
    for line, fits in (
        ("none", True),
        ("HassCancelAllTimers", True),
        ("HassTurnOn | name=aquarium pump", True),
        ("HassTurnOn | name=aquarium", False),
        ("HassTurnOn | domain=", False),
        ("HassTurnOn | domain=light ", False),
        ("HassClimateSetTemperature | temperature=21.", False),
        ("HassTurn", False),
    ):
        assert line_fits(line, values, ended=True) == fits, line
    # A number said goes to one slot; one said twice, to two; when none is said, any may repeat.
    every_number = {slot: ANY_NUMBER for slot in NUMBER_SLOTS}
    assert line_fits("HassStartTimer | hours=5 | minutes=5", every_number.get, ended=True)
    for said_numbers, line, ended, fits in (
        (["2", "4"], "HassStartTimer | hours=2 | minutes=", False, True),
        (["2", "4"], "HassStartTimer | hours=2 | minutes=2", False, False),
        (["2", "4"], "HassStartTimer | hours=2 | minutes=2", True, False),
        (["2", "4"], "HassStartTimer | hours=2 | minutes=4", True, True),
        (["2", "4"], "HassStartTimer | hours=2 | minutes=4 ", False, False),  # no number left for seconds
        (["2", "2"], "HassStartTimer | hours=2 | minutes=2", True, True),
    ):
        assert (
            line_fits(line, lambda slot, n=said_numbers: n if slot in NUMBER_SLOTS else None, ended) == fits
        ), line
    # A word goes to one name: after `name=band saw`, no `area=band`, and the line may end.
    heard_areas = {"name": ["band saw"], "area": ["band", "garage"]}
    for line, ended, fits in (
        ("HassTurnOff | name=band saw | area=band", True, False),
        ("HassTurnOff | name=band saw | area=garage", True, True),
    ):
        assert line_fits(line, heard_areas.get, ended) == fits, line
    assert not line_fits("HassTurnOff | name=band saw ", {**heard_areas, "area": ["band"]}.get)
    # A device named takes no domain; an area does.
    assert not line_fits("HassTurnOn | name=attic fan | domain=", lambda slot: None)
    assert line_fits("HassTurnOn | area=kitchen | domain=light", lambda slot: None, ended=True)
    # Numbers are those said, in digits or English words; when none is, 0 to 100.
    assert numbers("set a timer for 1 hour and 30 minutes, 21.5 degrees") == ["1", "30", "21.5"]
    assert numbers("a timer for five minutes and twenty-one seconds, a hundred") == ["5", "21", "100"]
    grammar = IntentGrammar(model.token_texts, CONTEXT, None)
    assert grammar.values("brightness", "dim the lamp to forty percent") == ["40"]
    assert grammar.values("brightness", "dim the lamp") == [str(n) for n in range(101)]
    # Greedy decoding on random scores writes lines that parse, with the names allowed, whatever the
    # scores; after 12 steps the end of the answer scores best.
    transcript = "turn on the aquarium pump in the study for 20 minutes and 30 seconds"
    allowed = {"name": {"aquarium pump"}, "area": {"study"}} | {n: {"20", "30"} for n in NUMBER_SLOTS}
    lines = set()
    for seed in range(24):
        line = _greedy_line(model, "", transcript, seed, end_after=12)
        intent = parse_intent(line)
        assert line == NOT_RECOGNIZED or (intent is not None and line == intent.to_text()), line
        for slot, value in intent.slots.items() if intent else ():
            assert value in allowed.get(slot, {value}), line
        written = [v for slot, v in intent.slots.items() if slot in NUMBER_SLOTS] if intent else []
        assert len(written) == len(set(written)), line
        assert not (intent and {"name", "domain"} <= intent.slots.keys()), line
        lines.add(line)
    assert len(lines) >= 8 and sum("=" in line for line in lines) >= 4, lines
    # Even when every token that fits scores below all others, one of them is chosen.
    for start in ("", "HassTurnOn | name=aqu", "HassStartTimer | minutes=20 | "):
        ids = model.tokenizer(start, add_special_tokens=False)["input_ids"]
        grammar = IntentGrammar(model.token_texts, CONTEXT, transcript)
        values = functools.partial(grammar.values, transcript=transcript)
        n = len(model.token_texts.texts)
        fit = torch.tensor([grammar._fits_after(start, t, values) for t in range(n)])
        scores = torch.rand(1, n) - 2.0 * fit
        assert fit[int(grammar(torch.tensor([ids]), scores).argmax())], start


def test_understood_names_are_the_households_or_the_texts(model: SpeechLLM) -> None:
    """The micro LLM, which has not learnt the unseen household's names, still names only those."""
    household = next(h for h in load_households() if h.split == "unseen")
    context = context_text(household)
    known = {d.name for d in household.devices} | set(household.areas)
    named = 0
    for command in generate_commands(household, 40, random.Random(1)):
        intent = model.understand_text(command.text, context)
        for slot in ("name", "area"):
            if intent is not None and slot in intent.slots:
                named += 1
                assert intent.slots[slot] in known | set(heard(command.text, [])), (command.text, intent)
    assert named >= 5


def test_readout_is_nearest_token_embedding(model: SpeechLLM) -> None:
    ids = model.text_ids("turn on the porch light")
    table = model.llm.get_input_embeddings().weight
    padded = torch.cat([table[ids], table[[model.tokenizer.pad_token_id] * 4]])
    assert model.readout(padded + 1e-3) == "turn on the porch light"


def test_bundle_round_trip_gives_the_same_outputs(
    model: SpeechLLM, micro_model: Path, tmp_path: Path, audio
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(micro_model, copy)
    cfg = load_bundle_config(copy)
    save_bundle_config(copy, cfg)
    again = SpeechLLM.load(copy)
    torch.testing.assert_close(again.project([audio])[0], model.project([audio])[0])
    assert again.run(audio, "aligned").transcript == model.run(audio, "aligned").transcript


def test_a_checkpoints_sampling_recipe_leaves_the_greedy_answer_alone(
    model: SpeechLLM, micro_model: Path, tmp_path: Path, audio
) -> None:
    """Qwen2.5-Instruct's generation_config.json asks for sampling with a repetition penalty; the answers
    stay greedy over the LLM's own scores (the penalty would push the intent line off the transcript's
    names)."""
    copy = tmp_path / "bundle"
    shutil.copytree(micro_model, copy)
    path = copy / "llm" / "generation_config.json"
    recipe = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 3.0}
    path.write_text(json.dumps(json.loads(path.read_text()) | recipe | {"no_repeat_ngram_size": 1}))
    again = SpeechLLM.load(copy)
    context = "areas: kitchen, hallway; devices: porch light, kettle"
    for path_name in ("aligned", "cascade"):
        got, expected = again.run(audio, path_name, context), model.run(audio, path_name, context)
        assert (got.transcript, got.intent) == (expected.transcript, expected.intent), path_name
    text = "turn on the porch light in the kitchen"
    assert again.understand_text(text, context) == model.understand_text(text, context)


def test_whisper_decoder_runs_on_a_second_load_inside_separate_decoder(
    micro_model: Path, tmp_path: Path, audio
) -> None:
    """The nightly job runs Whisper's decoder on a second load of Whisper, let go after the block, with the
    same answers; a Whisper that can no longer be read is a BundleError and the model's own stays."""
    copy = tmp_path / "bundle"
    shutil.copytree(micro_model, copy)
    model = SpeechLLM.load(copy)
    own, expected = model.whisper, model.run(audio, "cascade").transcript
    with model.separate_decoder():
        assert model.whisper is not own
        assert model.run(audio, "cascade").transcript == expected
    assert model.whisper is own
    for weights in Path(model.whisper_ref).glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(BundleError, match="cannot load Whisper again"), model.separate_decoder():
        pass
    assert model.whisper is own and model.run(audio, "cascade").transcript == expected


def test_a_narrower_checkpoint_loads_wider_as_from_pretrained_would(model: SpeechLLM, tmp_path: Path) -> None:
    """A bfloat16 checkpoint run in float32 (Qwen2.5 on a CPU) is widened tensor by tensor, to the same
    weights and outputs as `from_pretrained(dtype=float32)` gives, ties kept."""
    deepcopy(model.llm).to(torch.bfloat16).save_pretrained(tmp_path / "llm")
    lean = load_llm(str(tmp_path / "llm"), torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "llm", dtype=torch.float32)
    assert lean.dtype == lean.config.dtype == torch.float32
    assert lean.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(lean.state_dict()[name], tensor, rtol=0, atol=0)
    assert lean.get_output_embeddings().weight is lean.get_input_embeddings().weight
    ids = torch.tensor([model.text_ids("turn on the kitchen light")])
    torch.testing.assert_close(lean(ids).logits, plain(ids).logits)
    assert load_llm(str(tmp_path / "llm"), torch.bfloat16).dtype == torch.bfloat16  # no widening


def test_a_projector_says_which_loss_it_was_aligned_with(micro_model: Path, tmp_path: Path) -> None:
    """The nightly job fine-tunes a projector with the loss it was aligned with, so the checkpoint says."""
    path = micro_model / "projector.safetensors"
    _, info = load_projector(path)
    assert (info.objective, info.embedlink_weight) == ("combined", ALIGN_EMBEDLINK_WEIGHT)
    # A checkpoint from before projectors said so was aligned with EmbedLink, the only loss there was.
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("objective", "embedlink_weight")}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    _, old = load_projector(tmp_path / "old.safetensors")
    assert (old.objective, old.embedlink_weight) == ("embedlink", 1.0)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_projector_weights_give_a_clear_error(micro_model: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(micro_model, copy)
    weights = copy / "projector.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00garbage" * 100)
    else:
        weights.unlink()
    with pytest.raises(BundleError, match="projector.safetensors"):
        SpeechLLM.load(copy)


def test_projector_aligned_to_other_backbones_is_refused(micro_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(micro_model, copy)
    (copy / "llm2").symlink_to(copy / "llm")
    cfg = load_bundle_config(copy)
    cfg.llm = "llm2"
    save_bundle_config(copy, cfg)
    with pytest.raises(BundleError, match="aligned to"):
        SpeechLLM.load(copy)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle.json"):
        SpeechLLM.load(tmp_path)
