"""Messages <-> tensors <-> actions. Imports no ROS (messages are duck-typed by field name).

encoders  one message -> embeddings [n_tokens, hidden]   (build_encoder)
heads     hidden state -> action chunk or next token      (build_head)
safety    action chunk -> command a robot may receive     (ActuationGuard)
weights   encoder/head weights in policy.safetensors      (load_policy_weights)
"""

from capsule_ros.policy.encoders import ENCODER_KINDS, Encoder, build_encoder
from capsule_ros.policy.heads import HEAD_KINDS, ContinuousActionHead, TokenSampler, build_head
from capsule_ros.policy.safety import ActuationGuard, GuardResult
from capsule_ros.policy.weights import (POLICY_WEIGHTS_FILE, PolicyWeightsError, load_policy_weights,
                                        policy_weights_path, save_policy_weights)

__all__ = [
    "ENCODER_KINDS", "Encoder", "build_encoder",
    "HEAD_KINDS", "ContinuousActionHead", "TokenSampler", "build_head",
    "ActuationGuard", "GuardResult",
    "POLICY_WEIGHTS_FILE", "PolicyWeightsError", "load_policy_weights", "policy_weights_path",
    "save_policy_weights",
]
