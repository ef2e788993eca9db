"""Imported first by the bench scripts that start collectives, before torch or fp4ccl: NVLink multicast
off (these machines must keep it off: see the device notes) and this checkout's fp4ccl ahead of any
installed one."""
import os
import sys

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
