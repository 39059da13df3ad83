"""make check-model: is the committed model (models/) what train.py makes?

  python3 tests/check_model.py DIR     # DIR holds train.py's output and its log, train.log

Reports whether the retrained files are byte-identical to the committed ones
(they are on a machine like the one that trained them; another CPU or BLAS
rounds differently and lands on slightly different weights), and fails only if
the retrained validation loss differs from the model card's by more than the
tolerance the card states and justifies."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "models" / "README.md"


def main():
    out = Path(sys.argv[1])
    card = CARD.read_text()
    loss = float(re.search(r"validation loss \*\*(\d+\.\d+)\*\* nats per token", card)[1])
    tol = float(re.search(r"tolerance of \*\*(\d+\.\d+)\*\* nats", card)[1])
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    got = re.search(r"final validation loss (\d+\.\d+) nats per token", log)
    if not got:
        sys.exit(f"check_model.py: {out / 'train.log'} has no final validation loss: did train.py finish?")
    retrained = float(got[1])
    for name in ("tinystories.bin", "tinystories-tok.bin"):
        same = (out / name).read_bytes() == (ROOT / "models" / name).read_bytes()
        print(f"{name}: {'byte-identical to' if same else 'differs from'} the committed file")
    print(f"validation loss: retrained {retrained:.4f}, model card {loss:.4f}, difference "
          f"{retrained - loss:+.4f} (tolerance {tol})")
    if abs(retrained - loss) > tol:
        sys.exit(f"check_model.py: the retrained model's validation loss is {abs(retrained - loss):.4f} away from "
                 f"the card's, more than the tolerance {tol}: train.py no longer makes the committed model")
    print("check-model: the committed model is what train.py makes")


if __name__ == "__main__":
    main()
