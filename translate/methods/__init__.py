"""Methods by name: one tiny explicit table (STYLE rule 4). A new GAN is one new file + one row."""

from translate.methods import cgan, cut, cyclegan, gan, infogan
from translate.methods.base import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "cyclegan": MethodSpec(cyclegan.CycleGANConfig, cyclegan.build, cyclegan.check,
                           image_to_image=True),
    "cut": MethodSpec(cut.CUTConfig, cut.build, cut.check, image_to_image=True),
    "gan": MethodSpec(gan.GANConfig, gan.build, gan.check, gaussian_latent=True),
    "dcgan": MethodSpec(gan.GANConfig, gan.build, gan.check, gaussian_latent=True),
    "wgan_gp": MethodSpec(gan.WGANGPConfig, gan.build, gan.check, gaussian_latent=True),
    "cgan": MethodSpec(cgan.CGANConfig, cgan.build, cgan.check, cgan.resolve,
                       coded=cgan.SAMPLING),
    "infogan": MethodSpec(infogan.InfoGANConfig, infogan.build, infogan.check,
                          coded=infogan.SAMPLING),
}
