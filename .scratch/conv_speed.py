import torch, time
import torch.nn.functional as F
from nanollm.components.conv import CausalConv1d
torch.manual_seed(0)
c = CausalConv1d(1280, 4, bias=True)
x = torch.randn(1, 2048, 1280, requires_grad=True)
def shifted(conv, x):
    span = conv.span; padded = F.pad(x, (0, 0, span - 1, 0)); T = x.shape[1]
    out = conv.bias.expand_as(x) if conv.bias is not None else 0
    for j in range(conv.kernel_size[0]):
        start = j * conv.dilation[0]
        out = out + padded[:, start:start + T] * conv.weight[:, 0, j]
    return out
torch.testing.assert_close(shifted(c, x), c(x), atol=1e-5, rtol=0)
for name, f in (("conv", lambda: c(x)), ("shifted", lambda: shifted(c, x)), ("windows", lambda: c.by_windows(x))):
    f().sum().backward()
    ts=[]
    for _ in range(3):
        t=time.perf_counter(); f().sum().backward(); ts.append(time.perf_counter()-t)
    print(name, sorted(ts)[1])
