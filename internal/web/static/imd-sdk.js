// Placeholder until sdk-ts lands: `make web` replaces it with the SDK's browser bundle.
throw new Error("imd-sdk.js is not built yet: run make web");
