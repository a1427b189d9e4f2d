package main

import "github.com/firerunner/firerunner/internal/image"

func init() {
	register(command{name: "image", summary: "build or verify the guest image (image build|verify|dir)", run: image.CLI})
}
