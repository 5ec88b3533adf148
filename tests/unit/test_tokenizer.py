import pytest

from workbench.tokenizer import EOS_TOKEN, VOCAB_SIZE, load_fast_tokenizer, load_tokenizer

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "\tmixed  \t whitespace \n\n\n",
    "unicode: naïve café — 東京 🐍",
    'class A(B, metaclass=M):\n    """Doc."""\n',
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(text):
    tokenizer = load_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocab_and_special_token():
    fast = load_fast_tokenizer()
    assert fast.get_vocab_size() == VOCAB_SIZE
    assert fast.token_to_id(EOS_TOKEN) == 0
    tokenizer = load_tokenizer()
    assert tokenizer.bos_token == tokenizer.eos_token == EOS_TOKEN


def test_code_compresses_well():
    # A BPE tokenizer trained on Python source should need far fewer tokens than bytes.
    text = "import os\n\ndef main(argv=None):\n    for name in sorted(os.listdir('.')):\n        print(name)\n"
    ids = load_fast_tokenizer().encode(text).ids
    assert len(ids) < len(text.encode()) / 2.5
