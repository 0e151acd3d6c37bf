import pytest
import torch

from pti_ops.errors import InvalidInputError, TokenizerError
from pti_ops.placeholder import TrainableVectors, add_placeholder, placeholder_vectors, spliced_placeholder
from pti_ops.training.text_conditioning import encode_tokens, tokenize


def test_single_vector_placeholder_starts_at_the_initializer(tiny_bundle):
    tok, te = tiny_bundle.tokenizer, tiny_bundle.text_encoder
    before = te.get_input_embeddings().weight.clone()
    token = add_placeholder(tok, te, "tok1", "character")
    after = te.get_input_embeddings().weight
    assert token.token_ids == (len(before),)
    assert torch.equal(after[: len(before)], before)
    init_id = tok.convert_tokens_to_ids("character</w>")
    assert torch.equal(after[token.token_ids[0]], before[init_id])
    assert tok("an illustration of tok1", add_special_tokens=False).input_ids[-1] == token.token_ids[0]


def test_multi_vector_placeholder_expands_in_prompts(tiny_bundle):
    token = add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "tok1", "character", num_vectors=3)
    assert token.token_strings == ("tok1_0", "tok1_1", "tok1_2")
    assert token.expand("a tok1, in tok1 style") == "a tok1_0 tok1_1 tok1_2, in tok1_0 tok1_1 tok1_2 style"
    ids = tiny_bundle.tokenizer(token.expand("tok1"), add_special_tokens=False).input_ids
    assert tuple(ids) == token.token_ids


def test_multi_token_initializer_maps_one_token_per_vector(tiny_bundle):
    tok, te = tiny_bundle.tokenizer, tiny_bundle.text_encoder
    init_ids = tok("red character", add_special_tokens=False).input_ids
    before = te.get_input_embeddings().weight[init_ids].clone()
    token = add_placeholder(tok, te, "tok1", "red character", num_vectors=2)
    assert torch.equal(placeholder_vectors(te, token), before)


def test_placeholder_already_in_vocabulary_is_refused(tiny_bundle):
    with pytest.raises(TokenizerError, match="already contains the token 'character'"):
        add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "character", "person")


def test_initializer_of_several_tokens_for_one_vector_is_refused_before_any_change(tiny_bundle):
    size = len(tiny_bundle.tokenizer)
    with pytest.raises(TokenizerError, match="is 2 tokens .* set `num_vectors` to 2"):
        add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "tok1", "red character")
    assert len(tiny_bundle.tokenizer) == size
    assert tiny_bundle.text_encoder.get_input_embeddings().weight.shape[0] == size


@pytest.mark.parametrize("name", ["Tok1", "tok 1", "1tok", "", "tok-1"])
def test_bad_placeholder_names_are_refused(tiny_bundle, name):
    with pytest.raises(InvalidInputError, match="must be one lowercase word"):
        add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, name, "character")


def test_vectors_of_another_width_are_refused(tiny_bundle):
    with pytest.raises(InvalidInputError, match="expects \\[n_vectors, 32\\].*another model family"):
        add_placeholder(tiny_bundle.tokenizer, tiny_bundle.text_encoder, "tok1", "character", vectors=torch.zeros(1, 768))


def test_spliced_lookup_trains_only_the_placeholder_and_restores_the_module(tiny_bundle):
    tok, te = tiny_bundle.tokenizer, tiny_bundle.text_encoder
    token = add_placeholder(tok, te, "tok1", "character")
    base = te.get_input_embeddings()
    matrix = base.weight.clone()
    vectors = TrainableVectors(placeholder_vectors(te, token))
    ids = tokenize(tok, ["an illustration of tok1"])
    with pytest.raises(RuntimeError, match="stop"):
        with spliced_placeholder(te, token, vectors):
            encode_tokens(te, ids).sum().backward()
            assert vectors.raw.grad is not None and vectors.raw.grad.abs().sum() > 0
            with torch.no_grad():
                vectors.raw.add_(1.0)
            raise RuntimeError("stop")
    assert te.get_input_embeddings() is base and base.weight.grad is None
    assert torch.equal(base.weight[: token.token_ids[0]], matrix[: token.token_ids[0]])
    assert torch.equal(base.weight[token.token_ids[0]], matrix[token.token_ids[0]] + 1.0)


def test_fixed_norm_vectors_keep_their_norm():
    vectors = TrainableVectors(torch.randn(2, 8), fixed_norm=0.5)
    with torch.no_grad():
        vectors.raw.mul_(7.0)
    assert torch.allclose(vectors().norm(dim=-1), torch.full((2,), 0.5))
