"""The registry: every model and data set tierkit knows, by one name each.

    Dataset(name, title, licence, homepage, files=(Remote(path, urls, size, sha256), ...))   fetched by tierkit
    HubArtifact(name, ..., repo_id, files, kind)   (tiers.data.hub_entries)                 fetched by huggingface_hub
        -> REGISTRY[name]; get(name) looks one up, forgiving case and "_".
"""
from __future__ import annotations

from tiers.data.artifacts import DataError, Dataset, Entry, HubArtifact, Remote
from tiers.data.hub_entries import HUB

__all__ = ["REGISTRY", "DataError", "Dataset", "Entry", "HubArtifact", "Remote", "get"]

_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
_HH = ("https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/harmless-base/",
       "https://media.githubusercontent.com/media/anthropics/hh-rlhf/master/harmless-base/")
_SC = "https://storage.googleapis.com/download.tensorflow.org/data/", "http://download.tensorflow.org/data/"


def _files(folder: str, mirrors: tuple[str, ...], table: list[tuple[str, int | None, str | None]],
           remote_names: dict[str, str] | None = None) -> tuple[Remote, ...]:
    names = remote_names or {}
    return tuple(Remote(f"{folder}/{n}" if folder else n, tuple(m + names.get(n, n) for m in mirrors), size, sha)
                 for n, size, sha in table)


# Sizes and sha256 as published: MNIST and Fashion-MNIST by TensorFlow Datasets and many
# loaders (the MNIST test files in ../shared/data match the official md5 and these sha256);
# Speech Commands by TFDS/ESPnet; Tiny Shakespeare and hh-rlhf's test split match the
# reference copies; hh-rlhf's train split sha256 is as recorded by users of the repository,
# its size is not published (the file is ~13 MB in Git LFS), so it is checked by sha256 alone.
REGISTRY: dict[str, Entry] = {d.name: d for d in (
    Dataset("mnist", "MNIST handwritten digits (IDX)", "CC BY-SA 3.0 (LeCun, Cortes, Burges)",
            "http://yann.lecun.com/exdb/mnist/", _files("mnist", _MNIST, [
                ("train-images-idx3-ubyte.gz", 9_912_422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                ("train-labels-idx1-ubyte.gz", 28_881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                ("t10k-images-idx3-ubyte.gz", 1_648_877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                ("t10k-labels-idx1-ubyte.gz", 4_542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")]),
            folder="mnist", note="60,000 train + 10,000 test 28x28 digits; the LeCun site itself now refuses "
                                 "downloads, so the files come from the torchvision and TensorFlow mirrors"),
    Dataset("fashion-mnist", "Fashion-MNIST (Zalando, IDX)", "MIT", "https://github.com/zalandoresearch/fashion-mnist",
            _files("fashion-mnist", _FASHION, [
                ("train-images-idx3-ubyte.gz", 26_421_880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
                ("train-labels-idx1-ubyte.gz", 29_515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
                ("t10k-images-idx3-ubyte.gz", 4_422_102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
                ("t10k-labels-idx1-ubyte.gz", 5_148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")]),
            folder="fashion-mnist", system_dirs=("/usr/share/datasets/fashion-mnist",),
            note="drop-in MNIST replacement, 10 clothing classes; Debian's dataset-fashion-mnist installs it "
                 "(recompressed, so its files are taken as they are, not checksummed)"),
    Dataset("tinyshakespeare", "Tiny Shakespeare (char-rnn)", "public domain text",
            "https://github.com/karpathy/char-rnn", (Remote(
                "tinyshakespeare.txt", ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
                1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
            note="1.1 MB of Shakespeare's plays, 65 distinct characters"),
    Dataset("speech-commands", "Speech Commands v0.02 (full, 35 words)", "CC BY 4.0 (Warden 2018)",
            "https://arxiv.org/abs/1804.03209", _files("", _SC, [
                ("speech_commands_v0.02.tar.gz", 2_428_923_189, "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58")]),
            extract="speech_commands_v0.02", note="105,829 one-second 16 kHz clips; unpacked to speech_commands_v0.02/"),
    Dataset("speech-commands-test", "Speech Commands v0.02 official test set (12 classes)", "CC BY 4.0 (Warden 2018)",
            "https://arxiv.org/abs/1804.03209", _files("", _SC, [
                ("speech_commands_test_set_v0.02.tar.gz", 112_563_277, "cc2a00c1147c2254e9be3fa0f779d8c17421dc349b86366567a8edfa9acd51df")]),
            extract="speech_commands_test_set_v0.02", note="4,890 clips in the 12-class layout"),
    Dataset("hh-rlhf", "Anthropic hh-rlhf, harmless-base preference pairs", "MIT",
            "https://github.com/anthropics/hh-rlhf", _files("hh-rlhf", _HH, [
                ("harmless-base-train.jsonl.gz", None, "bf3e1ecd3db61bf21d190f69351d26670c67aababa0fd282fa008c17a7202217"),
                ("harmless-base-test.jsonl.gz", 742_801, "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03")],
                {"harmless-base-train.jsonl.gz": "train.jsonl.gz", "harmless-base-test.jsonl.gz": "test.jsonl.gz"}),
            folder="hh-rlhf", note="42,537 train + 2,312 test {chosen, rejected} dialogue pairs"),
    Dataset("cifar-10", "CIFAR-10 (python pickle batches)", "free to use, cite Krizhevsky 2009",
            "https://www.cs.toronto.edu/~kriz/cifar.html", _files("", ("https://www.cs.toronto.edu/~kriz/",), [
                ("cifar-10-python.tar.gz", 170_498_071, "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")]),
            extract="cifar-10-batches-py", note="50,000 train + 10,000 test 32x32 colour images, 10 classes; "
                                                "unpacked to cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)"),
    # The 10,000-document slice of OpenWebText that Hugging Face hosts for the stas/openwebtext-10k loader;
    # size and sha256 as that loader's dataset_infos.json records them (49.7 MB of text unpacked).
    Dataset("openwebtext-sample", "OpenWebText, the first 10,000 documents (web text)",
            "CC0 1.0 (the extraction; pages keep their authors' rights)", "https://skylion007.github.io/OpenWebTextCorpus/",
            _files("", ("https://cdn-datasets.huggingface.co/nlp/datasets/openwebtext/",), [
                ("openwebtext-10k.tar.xz", 14_723_792, "1dd150ffa3361ab32fa9f129d1b5ce20ac48728be16be436558f844d1761c572")]),
            extract="openwebtext-10k", note="10,000 web pages linked from Reddit, one .txt per page (~50 MB, ~12M GPT-2 "
                                            "tokens); unpacked to openwebtext-10k/"),
    *HUB,
)}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get(name: str) -> Entry:
    """The entry named `name`, forgiving case and "_" for "-" (q4_k_m and q4-k-m alike)."""
    key = next((k for k in REGISTRY if _key(k) == _key(name)), None)
    if key is None:
        raise DataError(f"no data set named {name!r}, nor a model; known: {', '.join(REGISTRY)} "
                        f"(see `tierkit data list`)")
    return REGISTRY[key]
