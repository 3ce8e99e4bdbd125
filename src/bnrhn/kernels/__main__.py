"""``python -m bnrhn.kernels``: build the fused CPU gate kernels now (``make`` does it at set-up) and say
whether this process would use them."""

from bnrhn import kernels

if __name__ == "__main__":
    print(kernels.status())
