"""`rfm models import|list|verify` on tiny real checkpoints built in-process (no downloads)."""

from __future__ import annotations

import hashlib
import json
import string

import pytest
import torch

from appliance.backup import backup_workspace, restore_workspace
from appliance.cli import main
from appliance.model_registry import ModelImportError, import_model, list_models, verify_models
from appliance.workspace import open_workspace

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One small folder or file per kind, saved the way the real ones are distributed."""
    from torchvision.models.video import r3d_18

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)

    bert = root / "BiomedVLP-CXR-BERT-tiny"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "effusion", "pleural", "there", "is"]
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(bert / "vocab.txt")).save_pretrained(bert)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(bert)

    dino = root / "rad-dino-tiny"
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                       image_size=28, patch_size=14)
    transformers.Dinov2Model(config).save_pretrained(dino)
    transformers.BitImageProcessor().save_pretrained(dino)

    kinetics = root / "r3d_18-b3b3357e.pth"
    torch.save(r3d_18().half().state_dict(), kinetics)

    import tokenizers

    llm = root / "tiny-llama"
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *string.ascii_lowercase, " "])}
    core = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(llm)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(llm)
    return {"cxr-bert": bert, "rad-dino": dino, "r3d18-kinetics": kinetics, "llm": llm}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_import_each_kind_hashes_and_loads(workspace, checkpoints):
    ws = workspace
    entries = {kind: import_model(ws, kind, source) for kind, source in checkpoints.items()}

    bert = entries["cxr-bert"]
    assert bert.reference == "models/BiomedVLP-CXR-BERT-tiny"
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(bert.files)
    for rel, recorded in bert.files.items():
        assert recorded["sha256"] == _sha(checkpoints["cxr-bert"] / rel) == _sha(ws.root / bert.reference / rel)
    assert bert.details["hidden_size"] == 32 and bert.details["model_type"] == "bert"
    assert entries["rad-dino"].details["patch_size"] == 14 and not entries["rad-dino"].details["notes"]
    assert entries["r3d18-kinetics"].reference == "models/r3d_18-b3b3357e/r3d_18-b3b3357e.pth"
    assert entries["r3d18-kinetics"].details["classes"] == 400
    assert entries["llm"].details["architectures"] == ["LlamaForCausalLM"]

    registry = json.loads((ws.root / "models" / "registry.json").read_text())
    assert sorted(registry["models"]) == sorted(e.name for e in entries.values())
    assert [e.name for e in list_models(ws)] == sorted(e.name for e in entries.values())
    assert all(r.ok for r in verify_models(ws))

    # the appliance's own loaders take the imported copies by their site.yaml paths
    from appliance.models.greenrfm import build_text_encoder, build_vision_encoder

    assert build_text_encoder(ws.root / bert.reference).config.hidden_size == 32
    build_vision_encoder("lite", kinetics_weights=ws.root / entries["r3d18-kinetics"].reference)
    assert transformers.Dinov2Model.from_pretrained(ws.root / entries["rad-dino"].reference).config.patch_size == 14


def test_files_that_do_not_fit_the_kind_are_refused(workspace, checkpoints, tmp_path):
    ws = workspace
    with pytest.raises(ModelImportError, match="model_type 'bert', not a transformers Dinov2"):
        import_model(ws, "rad-dino", checkpoints["cxr-bert"])
    with pytest.raises(ModelImportError, match="names no causal LM architecture"):
        import_model(ws, "llm", checkpoints["cxr-bert"])

    no_tokenizer = tmp_path / "bert-no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((checkpoints["cxr-bert"] / name).read_bytes())
    with pytest.raises(ModelImportError, match="no tokenizer"):
        import_model(ws, "cxr-bert", no_tokenizer)

    mismatched = tmp_path / "bert-other-config"
    mismatched.mkdir()
    for p in checkpoints["cxr-bert"].iterdir():
        (mismatched / p.name).write_bytes(p.read_bytes())
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ModelImportError, match="word_embeddings.weight has shape .* config.json says"):
        import_model(ws, "cxr-bert", mismatched)
    (mismatched / "config.json").write_text(json.dumps(config))
    data = (mismatched / "model.safetensors").read_bytes()
    (mismatched / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelImportError, match="not a valid safetensors file"):
        import_model(ws, "cxr-bert", mismatched)

    llm_bin = tmp_path / "llm-bin-only"
    llm_bin.mkdir()
    for p in checkpoints["llm"].iterdir():
        if p.suffix != ".safetensors":
            (llm_bin / p.name).write_bytes(p.read_bytes())
    torch.save({"x": torch.zeros(2)}, llm_bin / "pytorch_model.bin")
    with pytest.raises(ModelImportError, match="has no weights \\(model.safetensors"):
        import_model(ws, "llm", llm_bin)

    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), tmp_path / "resnet18.pth")  # 2D, not r3d_18
    with pytest.raises(ModelImportError, match="not an r3d_18 state dict"):
        import_model(ws, "r3d18-kinetics", tmp_path / "resnet18.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled-module.pth")  # would need code to load
    with pytest.raises(ModelImportError, match="not a plain PyTorch state dict"):
        import_model(ws, "r3d18-kinetics", tmp_path / "pickled-module.pth")
    with pytest.raises(ModelImportError, match="unknown model kind"):
        import_model(ws, "gpt", checkpoints["llm"])
    assert not (ws.root / "models").exists() or list_models(ws) == []
    assert not list((ws.root / "models").glob(".importing-*"))


def test_names_replace_and_hard_links(workspace, checkpoints):
    ws = workspace
    first = import_model(ws, "other", checkpoints["llm"], name="llm-a", link=True)
    assert first.linked
    src = checkpoints["llm"] / "model.safetensors"
    assert (ws.root / "models" / "llm-a" / "model.safetensors").stat().st_ino == src.stat().st_ino
    with pytest.raises(ModelImportError, match="already in models/"):
        import_model(ws, "llm", checkpoints["llm"], name="llm-a")
    second = import_model(ws, "llm", checkpoints["llm"], name="llm-a", replace=True)
    assert second.kind == "llm" and not second.linked
    assert (ws.root / "models" / "llm-a" / "model.safetensors").stat().st_ino != src.stat().st_ino
    with pytest.raises(ModelImportError, match="model name"):
        import_model(ws, "llm", checkpoints["llm"], name="../escape")
    assert [e.kind for e in list_models(ws)] == ["llm"]


def test_verify_reports_changed_missing_and_extra_files(workspace, checkpoints, capsys):
    ws = workspace
    import_model(ws, "cxr-bert", checkpoints["cxr-bert"], name="bert")
    import_model(ws, "rad-dino", checkpoints["rad-dino"], name="dino")
    folder = ws.root / "models" / "bert"
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(weights))
    (folder / "vocab.txt").unlink()
    (folder / "notes.txt").write_text("added later")
    results = {r.name: r for r in verify_models(ws)}
    assert results["dino"].ok
    bert = results["bert"]
    assert (bert.changed, bert.missing, bert.extra) == (["model.safetensors"], ["vocab.txt"], ["notes.txt"])
    assert main(["models", "verify", "-w", str(ws.root), "dino"]) == 0
    capsys.readouterr()
    assert main(["models", "verify", "-w", str(ws.root)]) == 2
    captured = capsys.readouterr()
    assert "1 model(s) differ from what was imported: bert" in captured.err
    assert "changed: model.safetensors" in captured.out


def test_cli_import_list_and_backup_round_trip(workspace, checkpoints, tmp_path, capsys):
    ws = workspace
    assert main(["models", "import", "rad-dino", str(checkpoints["rad-dino"]), "-w", str(ws.root),
                 "--name", "rad-dino"]) == 0
    out = capsys.readouterr().out
    assert "pretrain.encoder.weights_dir: models/rad-dino" in out
    assert main(["models", "import", "cxr-bert", str(checkpoints["rad-dino"]), "-w", str(ws.root)]) == 2
    assert "not a BERT" in capsys.readouterr().err
    assert main(["models", "list", "-w", str(ws.root)]) == 0
    assert "rad-dino" in capsys.readouterr().out

    backup_workspace(ws, tmp_path / "b.tar")
    restored = open_workspace(restore_workspace(tmp_path / "b.tar", tmp_path / "restored").target)
    assert [r.ok for r in verify_models(restored)] == [True]
    backup_workspace(ws, tmp_path / "b-no-models.tar", include_models=False)
    restored = open_workspace(restore_workspace(tmp_path / "b-no-models.tar", tmp_path / "r2").target)
    assert not (restored.root / "models").exists()
