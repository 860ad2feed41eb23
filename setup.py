"""The one compiled part of ctrlkit: Canny's fused kernel (conditions/_canny_kernel.c). Everything else is in
pyproject.toml. ``optional=True``: without a C compiler the install still succeeds and conditions/canny.py uses the
same maps from OpenCV/numpy calls (about 2.5x slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "conditions._canny_kernel",
            sources=["conditions/_canny_kernel.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
