"""cat_coefficients.json has one typed home, format.CatRecord (issue 21 item 3): the fold
builds it, the writer writes its to_json(), read_record reads it back equal; a record that
is not one is refused naming the missing key and the file; an older record still reads."""

import json

import pytest
from test_exactness import cat_model, randomize

from axolotl_cat_plugin import CatError, export_cat
from axolotl_cat_plugin.core.format import FORMAT_VERSION, CatRecord, read_record
from axolotl_cat_plugin.core.state import cat_layers, cat_metadata

SKILLS = [{"name": "math", "source": "./math", "rank": 2, "lora_alpha": 4}]
MODULES = {"model.layers.0.self_attn.q_proj": {"coefficients": {"math": 0.75}, "rank": 2}}
TRAINING = {"steps": 3, "learning_rate": 0.05}


def test_an_export_reads_back_as_the_record_it_wrote_byte_for_byte(world, tmp_path):
    model = cat_model(world, granularity="rank")
    randomize(model)
    cat_metadata(model).extra["training"] = TRAINING
    out = export_cat(model, tmp_path / "out", rank=2)
    text = (out / "cat_coefficients.json").read_text()
    record = read_record(out)
    assert record.to_json() == text
    assert record == CatRecord.from_dict(json.loads(text), out / "cat_coefficients.json")
    assert (record.format_version, record.granularity, record.export_rank) == (2, "rank", 2)
    assert record.parametrization == "free" and record.prune_threshold is None
    assert record.skills == cat_metadata(model).skills and record.saved_modules == {}
    assert record.extra == {"training": TRAINING} and record.fit_finished is True
    assert set(record.modules) == {name for name, _ in cat_layers(model)}


def test_the_json_lists_the_keys_in_the_order_the_writer_always_wrote_them():
    """format_version, skills, the export's settings, extra (the plugin's fit_finished,
    training, baselines), modules, then saved_modules when there are any."""
    saved = {"lm_head": {"coefficients": {"math": 0.5}}}
    record = CatRecord(
        skills=SKILLS,
        modules=MODULES,
        granularity="module",
        parametrization="free",
        base_model="org/base",
        concatenated_rank=2,
        exported_rank=2,
        extra={"fit_finished": True, "training": TRAINING},
        saved_modules=saved,
    )
    written = {
        "format_version": FORMAT_VERSION,
        "skills": SKILLS,
        "granularity": "module",
        "parametrization": "free",
        "base_model": "org/base",
        "concatenated_rank": 2,
        "exported_rank": 2,
        "export_rank": None,
        "prune_threshold": None,
        "fit_finished": True,
        "training": TRAINING,
        "modules": MODULES,
        "saved_modules": saved,
    }
    assert record.to_json() == json.dumps(written, indent=2) + "\n"
    assert list(json.loads(record.to_json())) == list(written)


@pytest.mark.parametrize("key", ["skills", "modules"])
def test_a_record_without_a_key_it_needs_is_refused_naming_the_key_and_the_file(tmp_path, key):
    record = {"format_version": 2, "skills": SKILLS, "granularity": "module", "modules": MODULES}
    del record[key]
    (tmp_path / "cat_coefficients.json").write_text(json.dumps(record))
    with pytest.raises(CatError) as error:
        read_record(tmp_path)
    assert f"`{key}`" in str(error.value) and str(tmp_path / "cat_coefficients.json") in str(
        error.value
    )


def test_a_malformed_key_is_refused_naming_it_and_the_file(tmp_path):
    path = tmp_path / "cat_coefficients.json"
    path.write_text(json.dumps({"skills": SKILLS, "modules": ["q_proj"]}))
    with pytest.raises(CatError, match="`modules` is not an object") as error:
        read_record(tmp_path)
    assert str(path) in str(error.value)
    path.write_text("[1, 2]")
    with pytest.raises(CatError, match="not a JSON object"):
        read_record(tmp_path)


def test_a_version_1_record_reads_in_todays_terms_and_a_newer_one_is_refused(tmp_path):
    """0.1 wrote format_version 1 (or none): granularity `adapter` (now `model`), a skill's
    `alpha` (now `lora_alpha`), and no export settings; what it holds beyond them is kept."""
    old = {"skills": [{"name": "math", "alpha": 8}], "granularity": "adapter", "modules": {}}
    (tmp_path / "cat_coefficients.json").write_text(json.dumps({**old, "training": TRAINING}))
    record = read_record(tmp_path)
    assert record.format_version == 1 and record.granularity == "model"
    assert record.skills == [{"name": "math", "lora_alpha": 8}]
    assert record.base_model is None and record.exported_rank is None
    assert record.extra == {"training": TRAINING} and record.fit_finished is True

    newer = {**old, "format_version": FORMAT_VERSION + 1}
    (tmp_path / "cat_coefficients.json").write_text(json.dumps(newer))
    with pytest.raises(CatError, match=f"format_version {FORMAT_VERSION + 1}"):
        read_record(tmp_path)


@pytest.mark.parametrize(
    "extra, finished",
    [({}, None), ({"training": TRAINING}, True), ({"fit_finished": False}, False)],
)
def test_fit_finished_says_what_the_record_says(extra, finished):
    assert CatRecord(SKILLS, MODULES, extra=extra).fit_finished is finished
