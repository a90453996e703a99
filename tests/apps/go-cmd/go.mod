module example.com/devflow-fixture-shop/v2

go 1.19
