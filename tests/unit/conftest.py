from tests.fake_vllm import gateway_setup

__all__ = ["gateway_setup"]
