"""The reference is the engine: a build whose every matmul is matmul_reference
(make runref: the plain loops, run reading the rows in place) writes the same
text and the same logits, to the bit, as the fast build made with the same
flags (gcc: portable -O3), since the fast kernels compute the reference's sums
in its order. Prompts long enough for the prompt kernels (blocks of 1 to 192
tokens, tails of 1 to 4) and generation, on stories260K and the project's model,
fp32, int8 and int4."""

import pytest

from conftest import E, M, ROOT, STORIES, TOK512, existing, run

OWN, OWN_TOK = ROOT / "models" / "tinystories.bin", ROOT / "models" / "tinystories-tok.bin"
PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
          "friends. One day, she saw a big red ball under a tree and ran to get it.")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    out = {"run": [(STORIES, TOK512), (OWN, OWN_TOK)], "runq": []}
    for src, tok in out["run"]:
        for version in (2, 3):
            path = d / f"{src.stem}-v{version}.bin"
            E.write_checkpoint(M.load_checkpoint(str(src)), str(path), version)
            out["runq"].append((path, tok))
    return out


@pytest.mark.parametrize("engine", ["run", "runq"])
@pytest.mark.parametrize("block", [None, "1", "19", "100"])
def test_reference_build_is_bit_identical(engine, block, models, tmp_path):
    fast, ref = existing(f"build/{engine}-gcc"), existing(f"build/{engine}-ref")
    for model, tok in models[engine]:
        outputs = []
        for binary in (fast, ref):
            dump = tmp_path / f"{binary.rsplit('-', 1)[1]}.logits"
            env = {"RUN_DUMP_LOGITS": str(dump), **({"RUN_BLOCK": block} if block else {})}
            p = run(binary, model, "-z", tok, "-n", 256, "-s", 7, "-t", "0.9", "-i", PROMPT, env=env)
            outputs.append((p.stdout, dump.read_bytes()))
        assert len(outputs[0][0]) > 100 and len(outputs[0][1]) > 1000
        assert outputs[0] == outputs[1], f"{model.name}: the reference build's text or logits differ"
