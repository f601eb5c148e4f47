"""The bottom layer every other part stands on: ranks and the process group (`dist`), ZeRO-3 parameter access
(`zero`), autocast and evaluation mode (`precision`), seeding (`seeding`) and crash-safe file writes (`files`)."""
