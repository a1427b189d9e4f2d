package main

import "github.com/firerunner/firerunner/internal/image"

func init() {
	register(command{name: "image", summary: "build or verify the guest image", subs: []command{
		{name: "build", summary: "build the guest image (kernel, initramfs, rootfs) into the cache, as root", run: image.BuildCLI},
		{name: "verify", args: "[DIR]", summary: "check an image's artefacts against its manifest (default: the cache's latest)", run: image.VerifyCLI},
		{name: "dir", summary: "print the directory of the cache's latest image", run: image.DirCLI},
	}})
}
