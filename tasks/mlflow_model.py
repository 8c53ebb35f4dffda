"""The MLflow pyfunc that registered tuneship models load as: base model + LoRA adapter, greedy generation.

The adapter and tokenizer are the model's artifacts; the base model is a *reference* (id and revision in the
model config), resolved at load time the way the pipeline resolves it — an offline ``tuneship/<recipe>``
from the artifact store or per-user cache, a local directory, or a hub id — so a version does not carry a
copy of the base weights and still loads offline.

    model = mlflow.pyfunc.load_model("models:/retail-sql@champion")
    model.predict(["### Instruction:\\nHow many clients live in Paris?\\n\\n### Response:\\n"])

It decodes freely. A version evaluated under schema-constrained decoding (``evaluate.decoding: sql_schema``)
is served by the gateway under that grammar; its tag ``tuneship.sql_schema`` holds the schema to rebuild it
(``infra.sql_grammar``) where a grammar-aware runtime serves the pyfunc's weights.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from infra.artifacts import open_store
        from infra.settings import load_settings
        from tasks.base_model import resolve_base_model

        config = context.model_config
        settings = load_settings()
        base = resolve_base_model(config["base_model"], store=open_store(settings), cache_dir=settings.cache_dir)
        if base.revision != config["base_revision"]:
            raise RuntimeError(
                f"base model {config['base_model']} resolved to revision {base.revision}, "
                f"but this adapter was trained on {config['base_revision']}"
            )
        adapter = context.artifacts["adapter"]
        self.tokenizer = AutoTokenizer.from_pretrained(adapter)
        self.model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path), adapter)
        self.max_new_tokens = int(config.get("max_new_tokens", 128))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - no hints: MLflow would infer a schema
        from tasks.generation import greedy_generate

        if hasattr(model_input, "columns"):  # a DataFrame with a "prompt" column
            prompts = [str(p) for p in model_input["prompt"]]
        else:
            prompts = [str(p) for p in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new)
