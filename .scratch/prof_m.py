import torch, time
import nanollm
from nanollm.compiler import make_component, initialize
from nanollm.components import complete
config = nanollm.ModelConfig(d_model=512)
m = make_component(complete(nanollm.Call("mamba2", (("heads",16),("head_dim",64),("state",64),("groups",2))), "mixer", config), config)
initialize(m)
x = torch.randn(1, 2048, 512, requires_grad=True)
m(x).sum().backward()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    m(x).sum().backward()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
