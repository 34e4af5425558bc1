"""The hand-written dynamic-metadata encoding against upb's own: what Envoy parses must be the same."""

from __future__ import annotations

import asyncio

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from extproc.config import parse_config
from extproc.protocol import ExternalProcessor, encode_metadata
from extproc.routing import Flow, Routed, Router

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/a, api_base: "https://a.openai.azure.com", api_key: key-a, rpm: 100, tpm: 9000}
  - model_name: gpt-4o
    litellm_params: {model: azure/b, api_base: "https://b.openai.azure.com", api_key: key-b}
"""

values = st.one_of(
    st.text(max_size=300), st.booleans(), st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False),
)


def upb_struct(fields: dict[str, object]) -> struct_pb2.Struct:
    expected = struct_pb2.Struct()
    expected.update({"llm": fields})
    return expected


@given(st.dictionaries(st.text(max_size=200), values, max_size=20))
def test_encoded_metadata_parses_as_upb_builds_it(fields: dict[str, str | int | float | bool]) -> None:
    parsed = pb.ProcessingResponse.FromString(encode_metadata(fields))
    assert parsed.dynamic_metadata == upb_struct(fields)


def test_a_decision_carries_the_forward_and_all_its_metadata() -> None:
    router = Router(parse_config(CONFIG, environ={}))
    processor = ExternalProcessor(router)
    body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    for request_id in ("first", "second"):  # the second comes from the cache of constant parts
        decision = asyncio.run(router.on_body(Flow("chat/completions", None, request_id), body))
        assert isinstance(decision, Routed)
        parsed = pb.ProcessingResponse.FromString(processor.encode_decision(decision))
        assert parsed.HasField("request_body")
        llm = parsed.dynamic_metadata.fields["llm"].struct_value
        assert llm == upb_struct(decision.metadata).fields["llm"].struct_value
        assert llm.fields["request_id"].string_value == request_id
        assert llm.fields["stream"].bool_value is True
        assert llm.fields["operation"].string_value == "chat/completions"
        assert llm.fields["limit_requests"].string_value == "100"
        keys = parsed.dynamic_metadata.fields["llm_keys"].struct_value.fields
        assert {k: v.string_value for k, v in keys.items()} == {"key_0": "key-a", "key_1": "key-b"}
