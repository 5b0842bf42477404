"""A granularity is one registered class (issue 21): a new one, defined here and touching no
package file, trains, folds, exports and round-trips through plain PEFT exactly; and no
package module outside the strategy modules branches on a granularity's name, nor outside
the layer kinds' modules (core/layers/variants.py) on a layer's kind."""

import ast
import json
from pathlib import Path

import pytest
import torch
from fixtures import load_base
from peft import PeftModel
from test_exactness import TOKENS, TOLERANCE, logits, randomize, reference_model

from axolotl_cat_plugin import CatConfig, CatError, attach_cat, export_cat
from axolotl_cat_plugin.core.granularity import (
    SlotGranularity,
    granularity_names,
    register_granularity,
)
from axolotl_cat_plugin.core.granularity import base as registry
from axolotl_cat_plugin.core.state import cat_layers, coefficient_parameters, state_of

PACKAGE = Path(__file__).resolve().parent.parent / "axolotl_cat_plugin"
STRATEGY_MODULES = {
    "core/granularity/base.py",
    "core/granularity/slots.py",
    "core/granularity/joint_core.py",
}


class ModuleTypeGranularity(SlotGranularity):
    """One coefficient per skill per module type (q_proj, up_proj, ...) across all layers."""

    name = "module_type"
    description = "one coefficient per skill for every module type, shared across layers"
    source = "this test (issue 21)"

    def group(self, module_name: str) -> str:
        return module_name.rsplit(".", 1)[-1]


@pytest.fixture
def module_type(monkeypatch):
    """The registry with ModuleTypeGranularity added, restored after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return register_granularity(ModuleTypeGranularity())


def fit(world, **options):
    skills = [{"path": str(path), "name": name} for name, path in world["skills"].items()]
    return attach_cat(load_base(world["base"]), CatConfig(skills=skills, **options))


def test_a_granularity_defined_outside_the_package_trains_folds_and_round_trips(
    world, tmp_path, module_type
):
    assert "module_type" in granularity_names()
    model = fit(world, granularity="module_type")
    types = {name.rsplit(".", 1)[-1] for name, layer in cat_layers(model)}
    shared = {id(state_of(layer).coefficients) for _, layer in cat_layers(model)}
    assert len(coefficient_parameters(model)) == len(shared - {id(None)}) == len(types)

    # it trains through the ordinary loss: one step moves its coefficients
    before = {n: p.detach().clone() for n, p in coefficient_parameters(model).items()}
    optimizer = torch.optim.AdamW(coefficient_parameters(model).values(), lr=1e-2)
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in coefficient_parameters(model).items())

    randomize(model)
    trained = logits(model)
    out = export_cat(model, tmp_path / "export")
    record = json.loads((out / "cat_coefficients.json").read_text())
    assert record["granularity"] == "module_type"
    seen = {}
    for module_name, entry in record["modules"].items():
        for skill, c in entry["coefficients"].items():
            seen.setdefault((module_name.rsplit(".", 1)[-1], skill), set()).add(round(c, 7))
    assert seen and all(len(values) == 1 for values in seen.values())
    assert "every module type" in (out / "README.md").read_text()  # the card's description

    # the model is base + Σ c s B A with the coefficients it reports, and plain PEFT agrees
    assert (logits(reference_model(world, record["modules"])) - trained).abs().max() <= TOLERANCE
    loaded = PeftModel.from_pretrained(load_base(world["base"]), out)
    assert (logits(loaded) - trained).abs().max() <= TOLERANCE
    assert (logits(loaded.merge_and_unload()) - trained).abs().max() <= TOLERANCE

    # and the record starts a new fit exactly where this one ended (resume, re-export)
    resumed = fit(
        world, granularity="module_type", coefficients_from=str(out / "cat_coefficients.json")
    )
    assert (logits(resumed) - trained).abs().max() <= TOLERANCE


def test_the_yaml_block_offers_what_the_registry_holds(world, module_type):
    from axolotl_cat_plugin.integration.args import CatMergeConfig

    schema = CatMergeConfig.model_json_schema()["properties"]["granularity"]
    assert schema["enum"] == granularity_names()
    assert "module_type" in schema["enum"]
    block = CatMergeConfig(skills=[str(world["skills"]["math"])], granularity="module_type")
    assert block.granularity == "module_type"


def test_a_taken_name_is_refused(module_type):
    class Other(SlotGranularity):
        name = "module_type"

    with pytest.raises(CatError, match="already registered"):
        register_granularity(Other())


def granularity_branches(source: str, names: set[str]) -> list[str]:
    """Where code branches on a granularity: a name compared (==, in, is), given as the
    default of a `granularity` key or argument, or a member of the old Granularity enum /
    its `is_core`, `per_rank` flags. Docstrings and messages do not count."""
    found = []
    tree = ast.parse(source)

    def constants(node):
        return [
            n.value
            for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
        ]

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += constants(node)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and getattr(node.args[0], "value", 0) == ("granularity")
        ):  # record.get("granularity", "module")
            found += [value for arg in node.args[1:] for value in constants(arg)]
        elif isinstance(node, ast.keyword) and node.arg == "granularity":
            found += constants(node.value)
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "granularity":
            found += constants(node.value) if node.value else []
        elif isinstance(node, ast.Attribute) and (
            node.attr in ("is_core", "per_rank") or getattr(node.value, "id", "") == "Granularity"
        ):
            found.append(node.attr)
    return found


def test_the_detector_sees_the_branches_it_looks_for():
    names = {"module", "core", "rank"}
    assert granularity_branches("if g == 'core': pass", names) == ["core"]
    assert granularity_branches("x = r.get('granularity', 'module')", names) == ["module"]
    assert granularity_branches("if g is Granularity.RANK or s.is_core: pass", names)
    assert granularity_branches("x = {'rank': 0}; y = f(rank=1)", names) == []


def test_only_the_strategy_modules_name_a_granularity():
    """Per package module, the granularity names it branches on: only granularity/ does."""
    names = set(granularity_names()) | {"adapter"}
    mentions = {
        str(path.relative_to(PACKAGE)): sorted(set(found))
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := granularity_branches(path.read_text(), names))
    }
    assert set(mentions) <= STRATEGY_MODULES, mentions


def test_the_config_reference_describes_every_registered_granularity():
    """The `granularity` row of the cat_merge table names each registered choice."""
    readme = (PACKAGE.parent / "docs" / "config.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `granularity` |"))
    assert [name for name in granularity_names() if f"`{name}`" not in row] == []


def layer_kind_checks(source: str) -> list[str]:
    """Where code asks which kind a layer is: is_embedding / is_parameter_wrapper calls, or
    isinstance against PEFT's Embedding, ParamWrapper or ModulesToSaveWrapper."""
    kinds = {"Embedding", "ParamWrapper", "ModulesToSaveWrapper"}
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", getattr(node.func, "attr", ""))
        if name in ("is_embedding", "is_parameter_wrapper"):
            found.append(name)
        elif name == "isinstance" and len(node.args) == 2:
            target = node.args[1]
            found += [
                n.id if isinstance(n, ast.Name) else n.attr
                for n in ast.walk(target)
                if isinstance(n, (ast.Name, ast.Attribute))
                and (n.id if isinstance(n, ast.Name) else n.attr) in kinds
            ]
    return found


def test_only_the_layer_kind_modules_ask_a_layers_kind():
    """Per package module, the layer-kind checks it makes: only the kinds' own modules
    (variants.py and the kinds' math in embedding.py and experts.py); plan.py reads the base
    model's own nn.Embedding to shape a skill's factors, before anything is wrapped."""
    assert layer_kind_checks("if is_embedding(x) or isinstance(y, ParamWrapper): pass") == [
        "is_embedding",
        "ParamWrapper",
    ]
    allowed = {
        "core/layers/variants.py",
        "core/layers/embedding.py",
        "core/layers/experts.py",
        "core/skills/plan.py",
    }
    checks = {
        str(path.relative_to(PACKAGE)): sorted(set(found))
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := layer_kind_checks(path.read_text()))
    }
    assert set(checks) <= allowed, checks


def test_the_saved_modules_are_reached_through_the_kind_registry_alone():
    """attach, fold, apply_export and the static mixes reach the modules saved in full
    (layers/saved_modules.py, SavedModuleKind) only through layers/variants.py's MODULE_KINDS
    and each state's strategy: no other package module imports it."""
    importers = {
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").rpartition(".")[2] == "saved_modules"
    }
    assert importers == {"core/layers/variants.py"}, importers
