"""Models: IRM's MLP, ResNets, heads, and the encoder + head model.

* :func:`mlp` / :class:`MLP` (:mod:`jirm.models.irm_mlp`): the ColoredMNIST
  network of Arjovsky et al. (2019).
* :mod:`jirm.models.resnet`: Flax ResNet encoders (torchvision layout).
* :mod:`jirm.models.heads`: linear, two-layer, Xavier and ensemble heads.
* :func:`deep_model` / :func:`mlp_model` (:mod:`jirm.models.encoder_head`):
  an encoder plus a head with BatchNorm statistics, the interface of the
  (h)-level terms and the game methods, on a ResNet or on IRM's MLP.
* :mod:`jirm.models.convert`: torchvision ``.pth`` weights into a
  :class:`DeepModel`.

Example:
  >>> model = jirm.models.mlp(390)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 14, 14, 2)))
  >>> deep = jirm.models.deep_model('resnet18', head='linear')
"""

from jirm.models import heads  # pylint: disable=unused-import
from jirm.models import resnet
from jirm.models.encoder_head import DeepModel, MLPModel, deep_model, mlp_model
from jirm.models.heads import (EnsembleHead, LinearHead, MLPHead,
                               XavierLinearHead)
from jirm.models.irm_mlp import MLP, MLPEncoder, mlp
