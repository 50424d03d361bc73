"""Models loaded on several threads at once (a run's translate and features side by side): transformers'
from_pretrained swaps process-wide state while it builds a model, so every load holds
leccr.runtime.threads.MODEL_LOADING. Without it, this test's loads left tensors on the meta device
("Cannot copy out of meta tensor"), and later loads of the process failed too."""

import threading

from leccr.engines.mt import Seq2SeqTranslator
from leccr.features.text import TextStateEncoder
from leccr.tiny_models.mt import build_mt
from leccr.tiny_models.text import build_text_encoder

CORPUS = ["a red circle", "ein roter Kreis", "un cercle rouge", "a blue square"] * 5


def test_models_loaded_on_four_threads_at_once_all_load(tmp_path):
    mt = build_mt(tmp_path / "mt", CORPUS, seed=0)
    encoder = build_text_encoder(tmp_path / "text", CORPUS, seed=0)
    errors: list[str] = []
    start = threading.Barrier(4)

    def load(kind: str) -> None:
        start.wait()
        for _ in range(4):
            try:
                if kind == "mt":
                    assert Seq2SeqTranslator(mt, "none", "cpu", 4, 16, 1).translate(["a red circle"], "de")
                else:
                    assert TextStateEncoder(encoder, 0, "cpu", "fp32").dim > 0
            except Exception as error:  # noqa: BLE001 - every failure of every thread is collected
                errors.append(f"{kind}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=load, args=(kind,)) for kind in ("mt", "text", "mt", "text")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
