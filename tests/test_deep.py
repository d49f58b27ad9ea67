"""Deep models: ResNets, conv lowering, converter, CIFAR-MNIST, deep methods."""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jirm import data
from jirm.methods import deep
from jirm import objectives as O
from jirm.models import resnet
from jirm import schedules
from jirm import train as train_lib
from jirm import models
from jirm.methods import games


def _num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_689_512),
                                           ("resnet50", 25_557_032)])
def test_resnet_parameter_count_equals_torchvision(arch, expected):
  # torchvision.models.resnet18/50(num_classes=1000): 11,689,512 / 25,557,032.
  model = models.DeepModel(resnet.encoder(arch), models.LinearHead(1000))
  params, stats = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert _num_params(params) == expected
  assert model.encoder.num_features == (512 if arch == "resnet18" else 2048)
  # BatchNorm running stats are buffers: mean + var per BN channel.
  assert _num_params(stats) > 0


@pytest.mark.parametrize("stem,shape", [("imagenet", (3, 64, 32, 3)),
                                        ("cifar", (3, 16, 8, 3))])
def test_resnet_feature_shapes(stem, shape):
  # Traced, not run: shapes and pytree structure are all this checks (the
  # numbers: the float64 reference and converter parity tests).
  enc = resnet.encoder("resnet18", stem=stem)
  v = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros(shape)))
  feats, upd = jax.eval_shape(
      lambda v: enc.apply(v, jnp.ones(shape), train=True,
                          mutable=["batch_stats"]), v)
  assert feats.shape == (3, 512)
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(
      v["batch_stats"])


@pytest.mark.parametrize("hw,cin,cout,k,stride,pad", [
    ((9, 6), 5, 7, 3, 1, 1), ((8, 4), 4, 6, 3, 2, 1), ((16, 8), 3, 4, 7, 2, 3),
    ((4, 2), 6, 8, 1, 2, 0), ((2, 1), 8, 8, 3, 1, 1), ((5, 5), 2, 3, 3, 2, 0)])
def test_patch_lowering_equals_xla_conv(hw, cin, cout, k, stride, pad):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3,) + hw + (cin,))
  kernel = jax.random.normal(kk, (k, k, cin, cout))
  conv = lambda low, x, w: resnet.conv2d(x, w, stride, pad, low)
  ref = conv("xla", x, kernel)
  got = conv("patches", x, kernel)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  cot = jax.random.normal(kg, ref.shape)
  grads = lambda low: jax.grad(lambda x, w: jnp.sum(conv(low, x, w) * cot),
                               argnums=(0, 1))(x, kernel)
  for g_got, g_ref in zip(grads("patches"), grads("xla")):
    np.testing.assert_allclose(g_got, g_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 6, 3), (2, 8, 6, 3), (1, 1, 1, 2),
                                   (1, 2, 3, 1)])
def test_max_pool_equals_flax(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  pool = lambda x: nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(resnet.max_pool_3x3_s2(x), pool(x))
  # Random normal inputs have no ties: both gradients route to the argmax.
  cot = jax.random.normal(jax.random.key(2), pool(x).shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
  np.testing.assert_allclose(grad(resnet.max_pool_3x3_s2), grad(pool),
                             rtol=1e-6, atol=1e-6)


def test_batch_norm_matches_flax_and_torch_running_stats():
  x = 2.0 * jax.random.normal(jax.random.key(0), (6, 5, 3, 4)) + 1.0
  cot = jax.random.normal(jax.random.key(1), x.shape)
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = ref.init(jax.random.key(0), x)
  params = {"scale": jnp.array([1.0, 2.0, 0.5, -1.0]),
            "bias": jnp.array([0.0, 0.1, -0.2, 0.3])}
  stats = {"mean": jnp.full(4, 0.5), "var": jnp.full(4, 2.0)}

  def loss(module, p, x):
    y, upd = module.apply({"params": p, "batch_stats": stats}, x,
                          mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * cot), upd["batch_stats"]

  grad = lambda m: jax.value_and_grad(
      lambda p, x: loss(m, p, x), argnums=(0, 1), has_aux=True)(params, x)
  (l_got, st_got), g_got = grad(resnet.BatchNorm())
  (l_ref, _), g_ref = grad(ref)
  np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
  chex.assert_trees_all_close(g_got, g_ref, atol=2e-5, rtol=1e-4)
  assert variables["batch_stats"]["var"].shape == st_got["var"].shape
  # torch: running = 0.9 running + 0.1 batch; variance unbiased (n - 1).
  xf = np.asarray(x).reshape(-1, 4)
  np.testing.assert_allclose(st_got["mean"], 0.45 + 0.1 * xf.mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(st_got["var"], 1.8 + 0.1 * xf.var(0, ddof=1),
                             rtol=1e-5)
  # Eval mode normalises with the running statistics.
  y = resnet.BatchNorm(use_running_average=True).apply(
      {"params": params, "batch_stats": stats}, x)
  want = ((np.asarray(x) - 0.5) / np.sqrt(2.0 + 1e-5) *
          np.asarray(params["scale"]) + np.asarray(params["bias"]))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def _reference_resnet18(params, stats, x, train=True):
  """ResNet-18 (imagenet stem, BasicBlocks) from standard ops only: XLA's
  convolution, ``flax.linen.max_pool`` and BatchNorm written out with
  ``jnp.var`` (autodiff backward), torch's running-statistics rule. Walks
  jirm's parameter tree, in whatever dtype it is given."""
  new_stats = {}

  def conv(x, k, stride, pad):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def bn(path, p, s, x):
    c4 = lambda v: v.reshape(1, 1, 1, -1)
    if not train:
      return ((x - c4(s["mean"])) / jnp.sqrt(c4(s["var"]) + 1e-5) *
              c4(p["scale"]) + c4(p["bias"]))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = x.size // x.shape[-1]
    new_stats[path] = {
        "mean": 0.9 * s["mean"] + 0.1 * jax.lax.stop_gradient(mean),
        "var": 0.9 * s["var"] + 0.1 * jax.lax.stop_gradient(var) * n / (n - 1)}
    return ((x - c4(mean)) / jnp.sqrt(c4(var) + 1e-5) * c4(p["scale"]) +
            c4(p["bias"]))

  enc, st = params["encoder"], stats
  x = conv(x, enc["conv1"]["kernel"], 2, 3)
  x = jax.nn.relu(bn("bn1", enc["bn1"], st["bn1"], x))
  x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  for i in range(1, 5):
    for j in range(2):
      name = f"layer{i}_{j}"
      p, s = enc[name], st[name]
      stride = 2 if i > 1 and j == 0 else 1
      out = conv(x, p["conv1"]["kernel"], stride, 1)
      out = jax.nn.relu(bn(f"{name}/bn1", p["bn1"], s["bn1"], out))
      out = bn(f"{name}/bn2", p["bn2"], s["bn2"],
               conv(out, p["conv2"]["kernel"], 1, 1))
      if "downsample_conv" in p:
        x = bn(f"{name}/downsample_bn", p["downsample_bn"],
               s["downsample_bn"], conv(x, p["downsample_conv"]["kernel"],
                                        stride, 0))
      x = jax.nn.relu(out + x)
  feats = x.mean((1, 2))
  fc = params["head"]["params"]["fc"]
  logits = feats @ fc["kernel"] + fc["bias"][None]
  return logits, new_stats


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def test_resnet18_train_step_matches_standard_layers_in_float64():
  # One deep.make_step (ERM) of a narrow ResNet-18 on 64x32 inputs (the
  # CIFAR-MNIST shape: patch and XLA convolutions, separable pool, closed-form
  # BatchNorm backward) against the float64 reference above: logits, every
  # gradient and every updated running statistic. Float32 rounding is ~4e-6
  # (the same for standard float32 layers); a wrong formula is off by O(1),
  # a biased running variance by 1/(n-1) >= 4e-3.
  model = models.deep_model("resnet18", width=8)  # lowering='auto'.
  x = jax.random.uniform(jax.random.key(0), (2, 8, 64, 32, 3))
  y = (jax.random.uniform(jax.random.key(1), (2, 8)) < 0.5).astype(jnp.int32)
  batch = train_lib.EnvArrays(x, y, jnp.ones((2, 8)))
  params, stats = model.init(jax.random.key(2), x[0, :1])
  # Non-trivial BatchNorm affine parameters and running statistics.
  leaves, tdef = jax.tree.flatten(stats)
  ks = jax.random.split(jax.random.key(3), len(leaves))
  stats = jax.tree.unflatten(tdef, [l + 0.5 * jax.random.uniform(k, l.shape)
                                    for l, k in zip(leaves, ks)])
  # An "optimizer" that stores the gradient as its state and never moves.
  capture = optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  step = jax.jit(deep.make_step(model, O.erm(reduction="pooled") * 1.0,
                                capture, batch_size=8))
  state = deep.DeepState(jnp.zeros((), jnp.int32), params, stats,
                         capture.init(params), (), jax.random.key(4))
  new, aux = step(state, batch)
  grads = new.opt_state
  # The step draws a permutation of each env's 8 samples: the same set.
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a),
                                                       jnp.float64), t)
    p64, s64 = f64(params), f64(stats)
    x64 = jnp.asarray(np.asarray(x).reshape(16, 64, 32, 3), jnp.float64)
    y64 = jnp.asarray(np.asarray(y).reshape(16), jnp.float64)

    def loss(p):
      logits, st = _reference_resnet18(p, s64, x64)
      return optax.sigmoid_binary_cross_entropy(logits[:, 0], y64).mean(), (
          logits, st)

    (l_ref, (logits_ref, st_ref)), g_ref = jax.jit(jax.value_and_grad(
        loss, has_aux=True))(p64)
    l_ref, g_ref = float(l_ref), jax.tree.map(np.asarray, g_ref)
    st_ref = jax.tree.map(np.asarray, st_ref)
    eval_ref = np.asarray(jax.jit(
        lambda p: _reference_resnet18(p, s64, x64, train=False)[0])(p64))
  np.testing.assert_allclose(float(aux["total"]), l_ref, rtol=1e-5)
  worst = max(_rel_err(g, r) for g, r in zip(jax.tree.leaves(grads),
                                             jax.tree.leaves(g_ref)))
  # Measured 4.1e-6 here (AVX2), standard float32 layers 3.4e-6.
  assert worst < 1e-4, worst
  for path, want in st_ref.items():
    got = new.batch_stats
    for part in path.split("/"):
      got = got[part]
    for k in ("mean", "var"):
      assert _rel_err(got[k], want[k]) < 1e-5, (path, k)
  logits, _ = model.features(params, stats, x.reshape(16, 64, 32, 3), False)
  assert _rel_err(model.head_fn(params["head"], logits), eval_ref) < 1e-5
  feats, _ = model.features(params, stats, x.reshape(16, 64, 32, 3), True)
  assert _rel_err(model.head_fn(params["head"], feats), logits_ref) < 1e-5


def test_runtime_flag_parsing(monkeypatch):
  from jirm import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not runtime.eigen_convolutions()
  # JAX is initialised in this process: the flag cannot take effect.
  assert not runtime.configure_cpu(host_memory=False)
  assert "ynn" not in __import__("os").environ["XLA_FLAGS"]
  for flags, eigen in ((" ".join(runtime.XLA_CPU_FLAGS), True),
                       ("--xla_cpu_experimental_ynn_fusion_type=eltwise",
                        False)):
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert runtime.eigen_convolutions() is eigen
    assert runtime.configure_cpu(host_memory=False) is eigen
  assert runtime.retain_host_memory()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_converter_parity(arch):
  torch = pytest.importorskip("torch")
  from jirm.models import convert  # pylint: disable=g-import-not-at-top
  from jirm.models import torch_resnet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  tm = getattr(torch_resnet, arch)(num_classes=1)
  for m in tm.modules():  # Non-trivial running statistics.
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 1.5)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  tm.eval()
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  model = models.deep_model(arch)
  params, stats = convert.from_torchvision(sd, model)
  x = np.random.default_rng(0).random((4, 3, 64, 32), np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x)).numpy()
  feats, _ = model.features(params, stats, jnp.asarray(x.transpose(0, 2, 3, 1)),
                            train=False)
  out = model.head_fn(params["head"], feats)
  np.testing.assert_allclose(out, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_converter_rejects_wrong_architecture():
  from jirm.models import convert  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unexpected key 'features.0.weight'"):
    convert.from_torchvision({"features.0.weight": np.zeros((1,))},
                             models.deep_model("resnet18"))


# ----------------------------------------------------------------------------
# CIFAR-MNIST.


@pytest.fixture(scope="module")
def sources():
  return data.synthetic_cifar_mnist_sources(num_per_class=700, seed=0)


def _true_cifar_class(x_NHWC):
  # Synthetic CIFAR halves: class 9 (truck) is 80 grey levels brighter.
  return (x_NHWC[:, 32:].mean((1, 2, 3)) * 255 > 100).astype(np.int32)


def _digit(x_NHWC):
  return (x_NHWC[:, 2:30, 2:30].mean((1, 2, 3)) * 255 > 100).astype(np.int32)


@pytest.mark.parametrize("envs,ratios", [("2env", (0.999, 0.8)),
                                         ("4env", (0.999, 0.95, 0.9, 0.8))])
def test_cifar_mnist_exact_agreement_and_noise(sources, envs, ratios):
  s = data.cifar_mnist(0, envs=envs, train_num=1000, test_num=300,
                       val="none", sources=sources)
  assert s.train.x.shape[1:] == (1000 // len(ratios), 64, 32, 3)
  noisy = []
  for e, r in zip(range(len(ratios)), ratios):
    x, y, agree = s.train.x[e], s.train.y[e], s.train.agree[e]
    n = len(y)
    assert y.sum() == n // 2
    for label, n_class in ((1, n // 2), (0, n - n // 2)):
      assert agree[y == label].sum() == int(n_class * r)  # Exact counts.
    np.testing.assert_array_equal(agree, _digit(x) == y)
    noisy.append(_true_cifar_class(x) != y)
  assert s.test.agree[0].sum() == int(150 * 0.1) * 2
  rate = np.concatenate(noisy).mean()
  assert abs(rate - 0.1) < 4 * np.sqrt(0.09 / 1000)


def test_cifar_mnist_holdout_and_oracle(sources):
  s = data.cifar_mnist(1, train_num=1000, test_num=200, val="holdout",
                       val_fraction=0.2, oracle=True, sources=sources)
  assert s.train.sizes == (400, 400) and s.val.sizes == (100, 100)
  assert int(s.val.agree[0].sum()) == 2 * int(50 * 0.999)
  assert np.all(s.train.x[:, :, :32] == 0)  # Blank MNIST half.
  assert s.info["oracle"] and s.info["val_sizes"] == [100, 100]


@pytest.mark.parametrize("kwargs,match", [
    (dict(envs="3env"), "envs='3env'"),
    (dict(train_ratios=(0.9, 1.5)), "agreement ratio=1.5"),
    (dict(train_num=100_000), "needs more than"),
    (dict(val="random"), "val='random'")])
def test_cifar_mnist_bad_inputs(sources, kwargs, match):
  with pytest.raises(data.DataError, match=match):
    data.cifar_mnist(0, sources=sources, **kwargs)


def test_epoch_batch_draws_without_replacement():
  y = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
  arrays = train_lib.EnvArrays(y[..., None].astype(jnp.float32), y,
                               jnp.ones((2, 12)).at[1, 10:].set(0))
  rng = jax.random.key(0)
  seen = [train_lib.epoch_batch(arrays, rng, s, 5) for s in range(2)]
  env0 = np.concatenate([np.asarray(b.y[0]) for b in seen])
  env1 = np.concatenate([np.asarray(b.y[1]) for b in seen])
  assert len(set(env0.tolist())) == 10 and len(set(env1.tolist())) == 10
  assert env1.max() < 22  # Padding rows never drawn.


def test_irmbed_transform_shapes_and_normalisation():
  x = jnp.full((2, 64, 32, 3), 0.5)
  # Jitted: one compilation instead of one per operation.
  transform = jax.jit(deep.irmbed_transform, static_argnames="size")
  out = transform(x, jax.random.key(0), size=56)
  assert out.shape == (2, 56, 56, 3)
  expected = (0.5 - np.array(deep.IMAGENET_MEAN)) / np.array(deep.IMAGENET_STD)
  np.testing.assert_allclose(out[0, 10, 10], expected, atol=1e-5)
  np.testing.assert_allclose(transform(x, size=56)[1, 3, 3],
                             expected, atol=1e-5)


# ----------------------------------------------------------------------------
# Deep methods.


def test_irmv1_h_matches_hand_computation():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 2, (2, 6)).astype(np.int32)
  w, b = rng.normal(size=(3, 1)).astype(np.float32), np.float32([0.3])
  head = models.LinearHead()
  hp = {"params": {"fc": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}}
  logits = jnp.einsum("ebd,dc->ebc", feats, w) + b[None, None]
  out = O.Outputs(logits, jnp.asarray(labels), jnp.ones((2, 6)),
                  features=jnp.asarray(feats), head=head.apply,
                  head_params=hp)
  sig = lambda z: 1 / (1 + np.exp(-z))
  expected = 0.0
  for e in range(2):
    gs = []
    for half in (slice(0, None, 2), slice(1, None, 2)):
      f, yy = feats[e, half], labels[e, half]
      r = sig(f @ w[:, 0] + b[0]) - yy
      gs.append(((f * r[:, None]).mean(0), r.mean()))
    expected += np.mean(gs[0][0] * gs[1][0]) + gs[0][1] * gs[1][1]
  np.testing.assert_allclose(O.irmv1_h.value(out), expected, rtol=1e-5)


def _tiny_batch(num_envs=2, b=8, seed=0):
  k = jax.random.key(seed)
  x = jax.random.uniform(k, (num_envs, b, 16, 8, 3))
  y = jax.random.bernoulli(jax.random.fold_in(k, 1), 0.5,
                           (num_envs, b)).astype(jnp.int32)
  return train_lib.EnvArrays(x, y, jnp.ones((num_envs, b)))


def _game_term_encoder_grad(model, game, term, batch, env_grad=True):
  params, stats = jax.jit(model.init)(jax.random.key(0), batch.x[0, :1])
  gs = game.init(jax.random.key(1), params["head"],
                 model.encoder.num_features, batch.y.shape[0])

  def f(enc):
    p = dict(params, encoder=enc)
    feats, logits, _ = deep._forward(model, p, stats, batch.x, True)  # pylint: disable=protected-access
    out = O.Outputs(logits, batch.y, batch.valid, p, None, "binary", feats,
                    model.head_fn, p["head"])
    sg = jax.lax.stop_gradient
    g, _ = game.inner(gs, sg(p["head"]), out._replace(
        logits=sg(logits), features=sg(feats)), jnp.array(True))
    return term(env_grad=env_grad).value(out._replace(state=g))

  return jax.jit(jax.value_and_grad(f))(params["encoder"])


@pytest.mark.parametrize("name", ["invrat_ec_h", "invrat_ec_o", "invrat_eb"])
def test_invrat_penalty_moves_encoder(name):
  batch = _tiny_batch()
  if name == "invrat_eb":
    game = games.invrat_eb(embed_dim=4, hidden=8, lr=0.5, num_inners=20)
    model = models.deep_model("tiny", head="mlp", head_hidden=8)
  else:
    game = games.invrat_ec(name[-1], lr=0.5, num_inners=20)
    model = models.deep_model("tiny")
  value, g = _game_term_encoder_grad(model, game, game.term, batch)
  assert value > 0  # The env predictors beat the shared head.
  assert sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g)) > 0


def test_invrat_env_grad_option():
  batch = _tiny_batch()
  model = models.deep_model("tiny")
  game = games.invrat_ec("h", lr=0.5, num_inners=20)
  _, g_on = _game_term_encoder_grad(model, game, game.term, batch, True)
  _, g_off = _game_term_encoder_grad(model, game, game.term, batch, False)
  params, stats = jax.jit(model.init)(jax.random.key(0), batch.x[0, :1])

  def l_shared(enc):  # gap_scale * L_shared only.
    p = dict(params, encoder=enc)
    _, logits, _ = deep._forward(model, p, stats, batch.x, True)  # pylint: disable=protected-access
    return O._pooled_mean(O.Outputs(logits, batch.y, batch.valid))  # pylint: disable=protected-access

  g_shared = jax.jit(jax.grad(l_shared))(params["encoder"])
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(g_off), flat(g_shared), atol=1e-6)
  assert np.abs(flat(g_on) - flat(g_shared)).max() > 1e-6


def test_invrat_ec_resets_env_heads_to_shared_head():
  game = games.invrat_ec("h", num_inners=0)
  model = models.deep_model("tiny")
  batch = _tiny_batch()
  params, _ = model.init(jax.random.key(0), batch.x[0, :1])
  state = game.init(None, jax.tree.map(jnp.zeros_like, params["head"]), 16, 2)
  out = O.Outputs(jnp.zeros((2, 8, 1)), batch.y, batch.valid,
                  features=jnp.zeros((2, 8, 16)), head=model.head_fn)
  new, _ = game.inner(state, params["head"], out, jnp.array(True))
  for a, b in zip(jax.tree.leaves(new.env_params),
                  jax.tree.leaves(params["head"])):
    np.testing.assert_array_equal(a, jnp.stack([b, b]))
  kept, _ = game.inner(state, params["head"], out, jnp.array(False))
  assert all(float(jnp.abs(a).sum()) == 0
             for a in jax.tree.leaves(kept.env_params))


def test_irm_game_first_player_step_is_manual_sgd():
  model = models.deep_model("tiny", head="ensemble", num_envs=2)
  batch = _tiny_batch()
  params, stats = model.init(jax.random.key(0), batch.x[0, :1])
  feats, logits, _ = deep._forward(model, params, stats, batch.x, False)  # pylint: disable=protected-access
  game = games.irm_game_h(lr=0.1, momentum=0.0)
  state = game.init(None, params["head"], 16, 2)
  out = O.Outputs(logits, batch.y, batch.valid, features=feats,
                  head=model.head_fn)
  _, new_head = game.inner(state, params["head"], out, jnp.array(False))
  hp = params["head"]["params"]

  def risk0(k0, b0):  # Player 0 on env 0's batch, ensemble prediction.
    p = {"params": {"kernel": hp["kernel"].at[0].set(k0),
                    "bias": hp["bias"].at[0].set(b0)}}
    z = model.head_fn(p, feats[0])[None]
    return O.env_risks(O.Outputs(z, batch.y[:1], batch.valid[:1]))[0]

  gk, gb = jax.grad(risk0, argnums=(0, 1))(hp["kernel"][0], hp["bias"][0])
  np.testing.assert_allclose(new_head["params"]["kernel"][0],
                             hp["kernel"][0] - 0.1 * gk, atol=1e-6)
  np.testing.assert_allclose(new_head["params"]["bias"][0],
                             hp["bias"][0] - 0.1 * gb, atol=1e-6)
  assert not np.allclose(new_head["params"]["kernel"][1], hp["kernel"][1])


def test_build_method_errors():
  with pytest.raises(ValueError, match="unknown deep method 'irmv2'"):
    deep.build_method("irmv2")
  with pytest.raises(ValueError, match="needs a penalty schedule"):
    deep.build_method("invrat_ec_h")


def _initial_state(model, game, opt, batch):
  params, stats = model.init(jax.random.key(0), batch.x[0, :1])
  return deep.DeepState(jnp.zeros((), jnp.int32), params, stats,
                        opt.init(params),
                        game.init(None, params["head"], 16, 2),
                        jax.random.key(0))


def test_deep_step_traces_once():
  model = models.deep_model("tiny")
  game = games.invrat_ec("h", num_inners=3)
  sched = lambda step: jnp.where(step >= 1, 10.0, 0.0)
  obj = O.erm(reduction="pooled") + sched * game.term
  opt = optax.adam(1e-3)
  batch = _tiny_batch(b=16)
  state = _initial_state(model, game, opt, batch)
  step = chex.assert_max_traces(
      deep.make_step(model, obj, opt, batch_size=8, game=game,
                     anneal_step=1, head_update="frozen"), n=1)
  step = jax.jit(step)
  for _ in range(3):
    state, aux = step(state, batch)
  assert int(state.step) == 3 and np.isfinite(float(aux["total"]))


def test_frozen_head_does_not_move_after_anneal():
  model = models.deep_model("tiny")
  game = games.invrat_ec("h")
  obj = O.erm(reduction="pooled") + 10.0 * game.term
  opt = optax.sgd(0.1)
  batch = _tiny_batch(b=16)
  state = _initial_state(model, game, opt, batch)
  step = jax.jit(deep.make_step(model, obj, opt, batch_size=8, game=game,
                                anneal_step=1, head_update="frozen"))
  s1, _ = step(state, batch)      # step 0: before anneal, head trains.
  s2, _ = step(s1, batch)         # step 1: frozen.
  head = lambda s: np.concatenate([np.ravel(x) for x in
                                   jax.tree.leaves(s.params["head"])])
  assert not np.allclose(head(state), head(s1))
  np.testing.assert_array_equal(head(s1), head(s2))


@pytest.mark.parametrize("preset,count", [("domainbed", 1), ("irm", 3)])
def test_domainbed_schedule_resets_adam_on_deep_models(preset, count):
  # Intended change of the one-trainer rebuild: deep.make_step used to drop
  # the schedule's optimizer reset (the ResNet path never called reset_at).
  # Reset at the anneal step 2: after 3 updates Adam has counted 1 step.
  model = models.deep_model("tiny")
  sched = schedules.preset(preset, weight=10.0, anneal=2)
  obj = O.erm(reduction="pooled") + sched * O.irmv1(variant="split_perm")
  opt = optax.adam(1e-3)
  batch = _tiny_batch(b=16)
  params, stats = model.init(jax.random.key(0), batch.x[0, :1])
  state = deep.DeepState(jnp.zeros((), jnp.int32), params, stats,
                         opt.init(params), (), jax.random.key(0))
  step = jax.jit(deep.make_step(model, obj, opt, batch_size=8))
  for _ in range(3):
    state, _ = step(state, batch)
  assert int(state.opt_state[0].count) == count
